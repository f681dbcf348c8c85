"""Data-parallel training in two processes with ``accelerate launch`` (gloo on CPU)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, micro_overrides

pytestmark = pytest.mark.slow  # runs the CLI / a server / training in subprocesses


def test_two_process_accelerate_run_renders_data_and_preset_once(micro_model, tmp_path):
    """Neither the synthetic dataset nor the preset exists yet: the main process renders them, the other
    waits for them (both rendering into the same temporary folder broke the run), then both train."""
    out = tmp_path / "runs" / "ddp"
    data = tmp_path / "shapes"
    overrides = [o for o in micro_overrides(micro_model, data, out, steps=3) if not o.startswith("model.pretrained")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline.cli",
           "train", "configs/base/vae.yaml", *overrides, "model.pretrained=micro", "data.synthetic.n=32",
           "data.synthetic.size=32", "train.what=unet", "train.mixed_precision=no"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["num_processes"] == 2 and report["steps"] == 3 and report["num_images"] == 32
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert len((data / "metadata.jsonl").read_text().splitlines()) == 32
    assert not list(tmp_path.glob("*.tmp")) and not list((tmp_path / "runs" / ".presets").glob("*.tmp"))
    assert (tmp_path / "runs" / ".presets" / "preset-micro" / "model_index.json").is_file()
