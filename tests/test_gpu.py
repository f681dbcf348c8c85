"""The GPU user's path, on a real CUDA device (skipped without one; run them where a GPU is lent:
``pytest -m gpu``). tests/test_devices.py checks the same device handling on a CPU with the meta device."""
import numpy as np
import pytest

from tests.conftest import micro_overrides, run_cli

pytestmark = pytest.mark.gpu


def test_the_vae_stage_and_a_cached_unet_stage_train_and_sample_on_the_gpu(micro_model, micro_data, tmp_path):
    """The VAE stage used to stop at its last step (CPU images into a CUDA VAE in the grid and the
    latent scale); the UNet stage caches latents under autocast in chunks and reports its peaks."""
    from core.config import load_config
    from training.config import TrainConfig
    from training.train import main

    for name, extra in (("vae", ["train.what=vae", "train.ema_decay=null"]),
                        ("lazy", ["train.mixed_precision=bf16", "train.cache=true", "data.flip=true"]),
                        ("unet", ["train.mixed_precision=bf16", "train.cache=true", "train.cache_fill=upfront"])):
        out = tmp_path / name
        report = main(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, out, 2) + extra))
        assert report["steps"] == 2 and report["peak_gpu_mem_gb"] is not None, report
        assert (out / "model" / "model_index.json").is_file() and list((out / "samples").glob("*.png"))
    assert report["cache_peak_gpu_mem_gb"] is not None


def test_the_engine_on_the_gpu_draws_what_the_cpu_draws(micro_model):
    from core.sampling import GenerationRequest, load_generator

    req = GenerationRequest("a red circle", num_inference_steps=4, guidance_scale=3.0, seed=1, width=32, height=32)
    cpu = load_generator(str(micro_model), device="cpu").generate([req])[0][0]
    gpu = load_generator(str(micro_model), device="cuda").generate([req])[0][0]
    assert np.abs(cpu.astype(int) - gpu.astype(int)).mean() < 2.0


def test_the_gpu_export_builds_fp16_and_onnx_on_cuda_and_serves_them_there(micro_model, tmp_path):
    from export.loader import load
    from export.manifest import read_manifest

    out = tmp_path / "exp"
    res = run_cli("export", str(micro_model), "--out", str(out), "--variants",
                  "eager-fp32,eager-fp16,compile,onnx-fp32,onnx-fp16", "--device", "cuda", "--num-images", "8",
                  "--repeats", "1", "--batch-sizes", "1", "--steps", "4", "--max-fid-drift", "1000",
                  "--max-adherence-drop", "100", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.device == "cuda" and manifest.hardware.gpu
    for name in ("eager-fp32", "eager-fp16", "compile", "onnx-fp32", "onnx-fp16"):
        e = manifest.variants[name]
        assert e.status == "ok" and e.quality.within_tolerance, (name, e.reason)
    # the ONNX sessions refuse to start when CUDAExecutionProvider is not the one active
    assert load(out, "onnx-fp16").backend.un.get_providers()[0] == "CUDAExecutionProvider"
    assert str(load(out, "eager-fp16").backend.device).startswith("cuda")
