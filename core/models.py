"""Finding and reading a diffusers model dir: where it is, its sizes, its parts.

A model dir is a standard Stable Diffusion pipeline folder (``model_index.json`` + ``unet/ vae/
text_encoder/ tokenizer/ scheduler/``); a hub id works too where the machine is online.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from core.errors import UserError


def resolve_model(model: str) -> tuple[str, bool]:
    """Returns (path or hub id, is_local). A missing local path is a clear error."""
    p = Path(model)
    if p.exists():
        if not (p / "model_index.json").exists():
            raise UserError(f"{model} is not a diffusers model dir (no model_index.json)")
        return str(p), True
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model dir {model} does not exist (and is not a hub id like 'org/name')")
    return model, False


def vae_scale(vae_config) -> int:
    """Pixels per latent cell along a side (8 for SD's VAE, 4 for the tiny preset's)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_factor(vae_config, unet_config) -> int:
    """Image sides must be multiples of this: the VAE's and the UNet's downsampling, and diffusers'
    pipelines want multiples of 8."""
    return math.lcm(8, vae_scale(vae_config) * 2 ** (len(unet_config["block_out_channels"]) - 1))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def model_meta(model_dir: Path) -> dict:
    """Sizes the sampling loop needs, read from the configs (no weights loaded)."""
    model_dir = Path(model_dir)
    vae = read_json(model_dir / "vae" / "config.json")
    unet = read_json(model_dir / "unet" / "config.json")
    scale = vae_scale(vae)
    return {"vae_scale": scale, "latent_channels": vae["latent_channels"],
            "scaling_factor": vae.get("scaling_factor", 0.18215), "native_size": unet["sample_size"] * scale,
            "size_factor": size_factor(vae, unet)}


def scheduler_config(model_dir: Path) -> dict:
    return read_json(Path(model_dir) / "scheduler" / "scheduler_config.json")


def load_tokenizer(model_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(Path(model_dir) / "tokenizer")


def load_torch_parts(model_dir: Path, dtype=None, device="cpu"):
    """Text encoder, UNet and VAE of a model dir in ``dtype`` (default fp32) on ``device``, in eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = dtype or torch.float32
    model_dir = Path(model_dir)
    try:
        # safetensors only: a .bin weight file is a pickle, and unpickling can run code
        te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtype, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype, use_safetensors=True)
        te, unet, vae = (m.to(device).eval() for m in (te, unet, vae))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load model {model_dir}: {first}") from None
    return te, unet, vae
