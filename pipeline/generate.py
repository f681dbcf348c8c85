"""``t2i generate MODEL PROMPT``: images from any model dir through the one sampling engine."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.config import Strict
from core.errors import UserError


class GenerateConfig(Strict):
    """Generate images for one prompt from a diffusers model dir."""

    model: str
    """Diffusers model dir (or hub id, online)."""
    prompt: str = Field(min_length=1)
    """Text prompt."""
    out: str = "out.png"
    """Output PNG; with num_images > 1 a grid, plus one file per image."""
    negative_prompt: str | None = None
    """What to steer away from."""
    steps: int = Field(20, ge=1, le=200)
    """Sampling steps."""
    guidance: float = Field(5.0, ge=0, le=30)
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed; image i uses seed + i."""
    scheduler: Literal["dpm", "ddim", "ddpm", "euler"] = "dpm"
    """Sampler."""
    num_images: int = Field(1, ge=1, le=16)
    """Images to generate."""
    size: int | None = Field(None, ge=8)
    """Image side (default: the model's native size)."""
    device: Literal["cpu", "cuda"] | None = None
    """cpu or cuda (default: cuda where available)."""


def generate(cfg: GenerateConfig) -> list[Path]:
    """Writes ``num_images`` images (and a grid when several); returns the paths."""
    import torch

    from core.images import image_grid
    from core.io import save_image
    from core.models import check_size, model_meta, resolve_model
    from core.sampling import GenerationRequest, load_generator

    if not cfg.prompt.strip():
        raise UserError("prompt is empty")
    out_p = Path(cfg.out)
    if out_p.suffix.lower() != ".png":
        raise UserError(f"--out {cfg.out} must end in .png")
    if not out_p.parent.exists():
        raise UserError(f"folder {out_p.parent} does not exist")
    path, local = resolve_model(cfg.model)
    if local and cfg.size:  # from the configs, before the weights load
        meta = model_meta(Path(path))
        check_size(cfg.size, cfg.size, meta["min_size"], meta["max_size"], meta["size_factor"], f"--size {cfg.size}:")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(cfg.model, cfg.scheduler, device=device)
    size = cfg.size or gen.native_size
    gen.check_size(size, size, f"--size {size}:")
    req = GenerationRequest(cfg.prompt, negative_prompt=cfg.negative_prompt or "", num_inference_steps=cfg.steps,
                            guidance_scale=cfg.guidance, seed=cfg.seed, width=size, height=size,
                            num_images=cfg.num_images)
    from PIL import Image

    images = [Image.fromarray(im) for im in gen.generate([req])[0]]
    if len(images) == 1:
        return [save_image(images[0], out_p)]
    paths = [save_image(im, out_p.with_name(f"{out_p.stem}-{i}.png")) for i, im in enumerate(images)]
    return paths + [save_image(image_grid(images), out_p)]
