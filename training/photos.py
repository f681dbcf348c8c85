"""Real photos that ship inside installable packages (scikit-image, scikit-learn), for an
autoencoder that must represent real images and for the real-photo benchmark: no download.

Also random crops at several scales with flips and colour jitter, and procedural textures.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from core.errors import UserError

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "page", "text", "moon", "camera", "coins", "brick",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "cat",
                  "clock", "horse", "logo", "microaneurysms")
"""The scikit-image photos that ship inside its wheel (no download)."""


def packaged_photos() -> dict[str, np.ndarray]:
    """name -> uint8 H x W x 3 of every packaged photo (grayscale ones replicated to 3 channels)."""
    try:
        import skimage.data as sk
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise UserError(f"the packaged photos need scikit-image and scikit-learn ({e}); "
                        "pip install scikit-image scikit-learn") from None
    out = {}
    for n in SKIMAGE_PHOTOS:
        try:
            im = np.asarray(getattr(sk, n)())
        except Exception:  # an image this scikit-image version does not ship (or cannot fetch offline)
            continue
        except BaseException as e:  # scikit-image skips the calling test when a download is missing
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            continue
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.dtype != np.uint8:
            im = (255 * (im - im.min()) / max(1e-8, float(im.max() - im.min()))).astype(np.uint8)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        out[f"skimage:{n}"] = im[..., :3]
    ds = load_sample_images()
    for fname, im in zip(ds.filenames, ds.images):
        out[f"sklearn:{Path(fname).name}"] = np.asarray(im)[..., :3]
    return out


def random_crop(rng: random.Random, im: np.ndarray, size: int, jitter: bool = True,
                min_side: int | None = None) -> np.ndarray:
    """A square crop of log-uniform side (from ``min_side``, default half of ``size``, to the short side),
    resized to ``size``; with ``jitter``: horizontal flip, brightness/contrast/saturation and 20% grayscale."""
    h, w = im.shape[:2]
    lo = min(min_side or max(16, size // 2), h, w)
    s = int(round(math.exp(rng.uniform(math.log(lo), math.log(min(h, w))))))
    y, x = rng.randint(0, h - s), rng.randint(0, w - s)
    pil = Image.fromarray(im[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC)
    if jitter:
        if rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(0.7, 1.3))
        pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(0.7, 1.3))
        pil = ImageEnhance.Color(pil).enhance(rng.uniform(0.5, 1.5))
        if rng.random() < 0.2:
            pil = pil.convert("L").convert("RGB")
    return np.asarray(pil)


def texture(rng: random.Random, size: int) -> np.ndarray:
    """Procedural textures: multi-scale noise, gradients, stripes and checkers in random colours."""
    nprng = np.random.default_rng(rng.randrange(2**31))
    kind = rng.choice(["noise", "gradient", "stripes", "checker"])
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "noise":
        cells = rng.choice([2, 4, 8, 16, 32, 64])
        base = (nprng.random((cells, cells, 3)) * 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC)) / 255
    elif kind == "gradient":
        a, b = nprng.random(3), nprng.random(3)
        ang = rng.uniform(0, math.pi)
        t = np.cos(ang) * xx + np.sin(ang) * yy
        t = (t - t.min()) / max(1e-8, t.max() - t.min())
        img = a * (1 - t[..., None]) + b * t[..., None]
    else:
        f, ang = rng.uniform(2, 12), rng.uniform(0, math.pi)
        u = np.cos(ang) * xx + np.sin(ang) * yy
        v = -np.sin(ang) * xx + np.cos(ang) * yy
        m = (np.sin(2 * math.pi * f * u) > 0)
        if kind == "checker":
            m = m ^ (np.sin(2 * math.pi * f * v) > 0)
        img = np.where(m[..., None], nprng.random(3), nprng.random(3))
    if rng.random() < 0.2:
        img = np.repeat(img.mean(-1, keepdims=True), 3, -1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
