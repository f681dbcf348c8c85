"""eager-fp32 (the baseline), eager-bf16 (CPU and GPU), eager-fp16 (GPU): the diffusers modules
as they are, saved as a diffusers model dir in that precision."""
from __future__ import annotations

from pathlib import Path

import torch

from core.models import standardize_text_encoder
from export.common import copy_shared, load_torch_parts, torch_generator, write_meta

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Eager:
    def __init__(self, precision: str):
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.TOLERANCE = {"fp32": 0.0, "bf16": 12.0, "fp16": 6.0}[precision]

    def unsupported(self, device: str) -> str | None:
        if self.precision == "fp16" and device == "cpu":
            return "fp16 kernels are GPU-only in practice (CPU fp16 convolutions are emulated and slow)"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        te, unet, vae = load_torch_parts(model_dir, self.dtype)
        copy_shared(model_dir, out_dir)
        te.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
        standardize_text_encoder(out_dir / "text_encoder")
        unet.save_pretrained(out_dir / "unet", safe_serialization=True)
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        write_meta(model_dir, out_dir)
        return {"format": "diffusers", "dtype": self.precision}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        te, unet, vae = load_torch_parts(var_dir, self.dtype, device)
        return torch_generator(var_dir, te, unet, vae, self.dtype, device, {"variant": f"eager-{self.precision}"})
