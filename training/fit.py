"""Does the model's autoencoder fit the data? The VAE round trip (encode -> decode) of a sample of
the dataset, measured before anything is trained: a base whose VAE cannot represent the images
will faithfully learn, evaluate, export and serve something else."""
from __future__ import annotations

import numpy as np
import torch

from core.images import to_pixels


@torch.no_grad()
def vae_round_trip(vae, pixels_uint8: np.ndarray, n: int = 32, batch: int = 16) -> dict:
    """PSNR (dB, per image then averaged) of the VAE's reconstruction of up to ``n`` evenly spaced
    images, and the mean chroma error (0-255) on those that are grayscale."""
    idx = np.linspace(0, len(pixels_uint8) - 1, min(n, len(pixels_uint8))).round().astype(int)
    x_all = to_pixels(torch.from_numpy(pixels_uint8[idx]))
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    psnrs, chroma = [], []
    for i in range(0, len(x_all), batch):
        x = x_all[i:i + batch]
        rec = vae.decode(vae.encode(x.to(device, dtype)).latent_dist.mean).sample.float().cpu().clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).mean(dim=[1, 2, 3]).clamp_min(1e-10)
        psnrs += (10 * torch.log10(1 / mse)).tolist()
        gray = (x.max(dim=1).values - x.min(dim=1).values).amax(dim=[1, 2]) < 1e-6
        if gray.any():
            r = (rec[gray] + 1) * 127.5
            chroma += (r - r.mean(dim=1, keepdim=True)).abs().mean(dim=[1, 2, 3]).tolist()
    return {"psnr_db": round(float(np.mean(psnrs)), 2), "psnr_db_min": round(float(np.min(psnrs)), 2),
            "images": len(idx), "gray_chroma_error": round(float(np.mean(chroma)), 2) if chroma else None}


def poor_fit_message(fit: dict, model: str, threshold: float) -> str | None:
    """The warning (with the remedy) when the fit is below ``threshold`` dB; None when it fits."""
    if fit["psnr_db"] >= threshold:
        return None
    return (f"the VAE of {model} reconstructs these images at {fit['psnr_db']:.1f} dB PSNR (below "
            f"{threshold:g} dB): a model trained on them will draw what the VAE can represent, not them. "
            "Train the VAE on this data first (a stage of its own with train.what=vae), or start from a base "
            "whose VAE fits (e.g. an SD 1.x checkpoint); data.on_poor_fit=error stops here instead")


def check(cfg) -> dict:
    """``t2i data check``: loads the dataset and the model's VAE + tokenizer; returns the findings."""
    from diffusers import AutoencoderKL

    from core.errors import UserError
    from core.models import load_tokenizer, model_meta, resolve_model
    from core.datasets import load_imagefolder, summary

    path, local = resolve_model(cfg.model)
    if not local:
        raise UserError(f"t2i data check needs a local model dir; {cfg.model} is not one")
    resolution = cfg.resolution or model_meta(path)["native_size"]
    data = load_imagefolder(cfg.path, resolution, cfg.image_column, cfg.caption_column, "skip", cfg.crop)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32, use_safetensors=True).eval()
    fit = vae_round_trip(vae, data.pixels, cfg.samples)
    return {"dataset": cfg.path, "model": cfg.model, "resolution": resolution,
            "summary": summary(data, load_tokenizer(path)), "vae_fit": fit,
            "poor_fit": poor_fit_message(fit, cfg.model, cfg.min_vae_psnr)}
