"""What we write, read by the tools users already run, at the versions they pin, with no code of ours.

The readers run in the compatibility environment ``.venv-compat`` (``scripts/compat_env.sh``, built by
``bash scripts/setup.sh test``: transformers 4.57, the diffusers that resolves beside it, Optimum's
ONNX Runtime pipelines), through ``tests/compat_worker.py`` in a subprocess. Each test compares what
they draw with what the main environment draws from the same artifact, seed and settings, in uint8.
Where that environment could not be built (no package registry), these tests are skipped with the
reason; where it was built but broke, they fail.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.compat

COMPAT = ROOT / ".venv-compat"
WORKER = ROOT / "tests" / "compat_worker.py"
BASE = ROOT / "models" / "tiny-base"
PROMPT = "a red circle on the left"


@pytest.fixture(scope="session")
def compat_python() -> Path:
    py = COMPAT / "bin" / "python"
    if (COMPAT / "FAILED").exists():
        pytest.fail(f".venv-compat could not be built: {(COMPAT / 'FAILED').read_text().strip()}")
    if not (COMPAT / ".t2i-compat-installed").exists():
        why = (COMPAT / "UNAVAILABLE").read_text().strip() if (COMPAT / "UNAVAILABLE").exists() else \
            "not built yet: run `bash scripts/compat_env.sh` (or `bash scripts/setup.sh test`)"
        pytest.skip(f"compatibility environment .venv-compat unavailable: {why}")
    return py


def worker(py: Path, *args, timeout: int = 900) -> dict:
    """Runs one compat_worker command in .venv-compat, outside the repo (so nothing of ours imports)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(py), str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         cwd="/", env={**env, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def request(**kw) -> dict:
    return {"prompt": PROMPT, "steps": 6, "guidance": 5.0, "seed": 1, **kw}


def main_env_sd(model_dir: Path, req: dict) -> np.ndarray:
    """The same request through plain diffusers in the main environment, default loading too."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(req["prompt"], num_inference_steps=req["steps"], guidance_scale=req["guidance"],
                  height=req.get("height"), width=req.get("width"),
                  generator=torch.Generator().manual_seed(req["seed"]), output_type="np").images
    return (np.asarray(images) * 255).round().astype(np.uint8)


def max_px_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_versions(compat_python):
    v = worker(compat_python, "versions")
    assert v["transformers"].startswith("4.") and v["optimum"] and v["onnxruntime"], v


@pytest.mark.slow
def test_text_encoders_load_every_weight_under_transformers_4(compat_python, micro_model, micro_finetune):
    for model in (BASE, micro_model, micro_finetune):
        te = worker(compat_python, "text-encoder", model)
        assert te["missing"] == [] and te["unexpected"] == [], (model, te)
        assert te["dtype"] == "torch.float32", (model, te)


def test_tokenizer_slow_and_fast_agree_with_ours(compat_python):
    from core.models import load_tokenizer

    prompts = [PROMPT, "a small purple star, top right, on a white background", "zyzzyva ünïcode 42"]
    got = worker(compat_python, "tokenizer", BASE, *prompts)
    ours = load_tokenizer(BASE)
    for cls, tok in got.items():
        assert tok["ids"] == [ours(p).input_ids for p in prompts], cls
        assert (tok["model_max_length"], tok["bos"], tok["eos"]) == (77, ours.bos_token_id, ours.eos_token_id)


@pytest.mark.parametrize("which", ["base", "finetune"])
def test_default_loading_draws_the_same_image_under_transformers_4(compat_python, which, micro_finetune, tmp_path):
    model = BASE if which == "base" else micro_finetune
    req = request()
    got = worker(compat_python, "sd", model, tmp_path / "img.npy", json.dumps(req))
    assert set(got["dtypes"].values()) == {"torch.float32"}, got
    assert max_px_diff(np.load(tmp_path / "img.npy"), main_env_sd(model, req)) <= 1


@pytest.fixture(scope="module")
def onnx_dir(micro_finetune, tmp_path_factory) -> Path:
    from export.variants import REGISTRY

    out = tmp_path_factory.mktemp("compat-onnx") / "onnx-fp32"
    REGISTRY["onnx-fp32"].build(micro_finetune, out, "cpu", {})
    return out


@pytest.mark.slow
def test_our_onnx_folder_in_optimum_at_two_sizes(compat_python, micro_finetune, onnx_dir, tmp_path):
    from core.sampling import GenerationRequest
    from export.variants import REGISTRY

    gen = REGISTRY["onnx-fp32"].load(onnx_dir, "cpu")
    for side in (gen.native_size, 2 * gen.native_size):
        req = request(height=side, width=side)
        got = worker(compat_python, "ort", onnx_dir, tmp_path / "ort.npy", json.dumps(req))
        ort_img = np.load(tmp_path / "ort.npy")
        assert ort_img.shape == (1, side, side, 3)
        ours = gen.generate([GenerationRequest(PROMPT, num_inference_steps=6, guidance_scale=5.0, seed=1,
                                               width=side, height=side)])[0][0]
        assert max_px_diff(ort_img[0], ours) <= 1, side
        assert max_px_diff(ort_img, main_env_sd(micro_finetune, req)) <= 1, side
        assert got["pipeline"] == "ORTStableDiffusionPipeline"
        # the one load-time message: Optimum unsqueezes its scalar timestep for our per-sample [batch] input
        assert all("timestep" in m for m in got["load_warnings"]), got


@pytest.mark.slow
def test_optimum_cli_export_of_our_model_dir_draws_our_image(compat_python, micro_finetune, tmp_path):
    out = tmp_path / "optimum-onnx"
    files = worker(compat_python, "optimum-export", micro_finetune, out)["files"]
    assert "unet/model.onnx" in files and "text_encoder/model.onnx" in files
    req = request()
    worker(compat_python, "ort", out, tmp_path / "img.npy", json.dumps(req))
    assert max_px_diff(np.load(tmp_path / "img.npy"), main_env_sd(micro_finetune, req)) <= 1
