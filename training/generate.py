"""``t2i generate``: images from any model dir through diffusers' own StableDiffusionPipeline."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from training.errors import UserError

SCHEDULERS = {"dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
              "euler": "EulerDiscreteScheduler"}


def load_pipeline(model: str, scheduler: str = "dpm", dtype: torch.dtype = torch.float32):
    import diffusers
    from diffusers import StableDiffusionPipeline

    from training.presets import resolve_model

    path, _ = resolve_model(model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {model}: {e}") from None
    cls = getattr(diffusers, SCHEDULERS[scheduler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(model: str, prompt: str, out: str, steps: int = 20, guidance: float = 5.0, seed: int = 0,
             scheduler: str = "dpm", num_images: int = 1, negative_prompt: str | None = None,
             size: int | None = None) -> list[Path]:
    """Writes ``num_images`` images (and a grid when several) for one prompt; returns the paths."""
    from training.model import image_grid

    if not prompt.strip():
        raise UserError("prompt is empty")
    if not 1 <= steps <= 200:
        raise UserError(f"--steps {steps} is outside 1..200")
    if not 0 <= guidance <= 30:
        raise UserError(f"--guidance {guidance} is outside 0..30")
    if not 1 <= num_images <= 16:
        raise UserError(f"--num-images {num_images} is outside 1..16")
    out_p = Path(out)
    if out_p.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    if not out_p.parent.exists():
        raise UserError(f"folder {out_p.parent} does not exist")
    pipe = load_pipeline(model, scheduler)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = pipe.unet.config.sample_size * vae_scale
    size = size or native
    factor = math.lcm(8, vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    if size % factor:
        raise UserError(f"--size {size} must be a multiple of {factor} for this model (native {native})")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    with torch.no_grad():
        images = pipe([prompt] * num_images, negative_prompt=[negative_prompt] * num_images if negative_prompt
                      else None, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      height=size, width=size).images
    paths = []
    if num_images == 1:
        paths.append(_save(images[0], out_p))
    else:
        for i, im in enumerate(images):
            paths.append(_save(im, out_p.with_name(f"{out_p.stem}-{i}.png")))
        paths.append(_save(image_grid(images), out_p))
    return paths


def _save(image, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
