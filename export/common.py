"""What the variant modules share: reading a model dir's non-network parts, and the Generator
over torch modules."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core.models import load_tokenizer, load_torch_parts, model_meta, scheduler_config  # noqa: F401
from core.sampling import Generator, TorchBackend

# Parts of a diffusers model dir that every variant copies unchanged.
SHARED_PARTS = ("tokenizer", "scheduler")


def copy_shared(model_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in SHARED_PARTS:
        shutil.copytree(model_dir / part, out_dir / part, dirs_exist_ok=True)
    for extra in ("model_index.json", "t2i_train.yaml"):
        if (model_dir / extra).exists():
            shutil.copy(model_dir / extra, out_dir / extra)


def make_generator(var_dir: Path, backend, info: dict | None = None) -> Generator:
    meta_src = var_dir / "meta.json"
    meta = json.loads(meta_src.read_text()) if meta_src.exists() else model_meta(var_dir)
    return Generator(backend, load_tokenizer(var_dir), scheduler_config(var_dir), meta["vae_scale"],
                     meta["latent_channels"], meta["scaling_factor"], meta["native_size"], info,
                     meta.get("size_factor"), meta.get("min_size"), meta.get("max_size"))


def torch_generator(var_dir: Path, te, unet, vae, dtype, device, info=None) -> Generator:
    return make_generator(var_dir, TorchBackend(te, unet, vae, dtype, device), info)


def write_meta(model_dir: Path, out_dir: Path, **extra) -> None:
    (out_dir / "meta.json").write_text(json.dumps({**model_meta(model_dir), **extra}, indent=2))


def dir_size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 2)


def save_quantized(out_dir: Path, modules: dict, filename: str) -> None:
    """Config + a torch.save'd state dict per module (quantized tensors are not safetensors-able)."""
    for name, module in modules.items():
        (out_dir / name).mkdir()
        if name == "text_encoder":
            module.config.to_json_file(out_dir / name / "config.json")
        else:
            module.save_config(out_dir / name)
        torch.save({k: v.cpu() for k, v in module.state_dict().items()}, out_dir / name / filename)


def empty_parts(var_dir: Path) -> dict:
    """Text encoder and UNet built from their configs, weights to be filled by load_state_dict."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(var_dir / "text_encoder")),
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(var_dir / "unet"))}
