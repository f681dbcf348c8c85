"""Each artifact we write, read by its real reader with default arguments (the main environment; the
same artifacts under transformers 4.x and Optimum: tests/test_compat.py; TensorBoard event files:
tests/test_train.py; export.json: tests/test_manifest.py)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import ROOT, micro_overrides

BASE = ROOT / "models" / "tiny-base"


def _image(pipe, seed: int = 1, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle on the left", num_inference_steps=4, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    return (np.asarray(images) * 255).round().astype(np.uint8)


def test_text_encoders_use_the_hub_layout_and_load_in_fp32(micro_model, micro_finetune):
    from transformers import CLIPTextModel

    for model in (BASE, micro_model, micro_finetune):
        with safe_open(str(model / "text_encoder" / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("text_model.") for k in keys), model
        assert json.loads((model / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
        assert CLIPTextModel.from_pretrained(model / "text_encoder").dtype == torch.float32
    # the fine-tune keeps the fp16 it was asked to save; only the loading dtype is fp32
    with safe_open(str(micro_finetune / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


@pytest.mark.parametrize("which", ["base", "finetune"])
def test_model_index_loads_with_default_arguments_and_generates(which, micro_finetune):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    model = BASE if which == "base" else micro_finetune
    pipe = DiffusionPipeline.from_pretrained(model)  # the class comes from model_index.json
    assert isinstance(pipe, StableDiffusionPipeline)
    index = json.loads((model / "model_index.json").read_text())
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert type(getattr(pipe, name)).__name__ == index[name][1] or name == "tokenizer", name
    assert {getattr(pipe, n).dtype for n in ("text_encoder", "unet", "vae")} == {torch.float32}
    assert _image(pipe).shape[1:] == (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2 + (3,)


def test_scheduler_folder_loads_in_training_and_sampling_schedulers(micro_finetune):
    import diffusers

    for model in (BASE, micro_finetune):
        cfg = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        for cls in (diffusers.DDPMScheduler, getattr(diffusers, cfg["_class_name"]), diffusers.EulerDiscreteScheduler):
            sched = cls.from_pretrained(model, subfolder="scheduler")
            sched.set_timesteps(10)
            assert len(sched.timesteps) == 10 and sched.config.num_train_timesteps == cfg["num_train_timesteps"]


def test_tokenizer_folder_loads_slow_fast_and_auto(micro_finetune):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    prompt = "a small purple star, top right"
    for model in (BASE, micro_finetune):
        files = {p.name for p in (model / "tokenizer").iterdir()}
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= files  # what transformers 4.x slow needs
        ids = {cls.__name__: cls.from_pretrained(model / "tokenizer")(prompt).input_ids
               for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer)}
        assert len({tuple(v) for v in ids.values()}) == 1, ids


@pytest.mark.slow
def test_lora_adapter_in_plain_diffusers_draws_the_fused_model(micro_model, micro_data, tmp_path):
    """``pipe.load_lora_weights(run/lora)`` on the base gives the image of the fused ``run/model``, with an
    alpha that differs from the rank (the scale travels in the adapter file's metadata)."""
    from diffusers import StableDiffusionPipeline

    from core.config import load_config
    from training.config import TrainConfig
    from training.train import main

    out = tmp_path / "lora"
    main(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, out, steps=3) + [
        "train.what=lora", "lora.rank=4", "lora.alpha=16", "train.learning_rate=2e-2",
        "logging.final_samples=false"]))
    base = StableDiffusionPipeline.from_pretrained(micro_model)
    before = _image(base)
    base.load_lora_weights(out / "lora")
    with_adapter = _image(base)
    fused = _image(StableDiffusionPipeline.from_pretrained(out / "model"))
    assert np.abs(fused.astype(int) - before.astype(int)).max() > 8  # the adapter changes the image
    assert np.abs(with_adapter.astype(int) - fused.astype(int)).max() <= 1


def test_train_report_is_documented(micro_finetune):
    """Every key of a real train_report.json is in docs/train-report-json.md."""
    report = json.loads((micro_finetune.parent / "train_report.json").read_text())
    doc = (ROOT / "docs" / "train-report-json.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)`", doc, flags=re.M))
    keys = set(report) | {f"data.{k}" for k in report.get("data") or {}}
    assert keys <= documented, sorted(keys - documented)
