"""Data-parallel training in two processes with ``accelerate launch`` (gloo on CPU)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, micro_overrides

pytestmark = pytest.mark.slow  # runs the CLI / a server / training in subprocesses


def test_two_process_accelerate_run(micro_model, micro_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline.cli",
           "train", "configs/base/vae.yaml", *micro_overrides(micro_model, micro_data, out, steps=3),
           "data.synthetic=null", "train.what=unet"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["num_processes"] == 2 and report["steps"] == 3
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
