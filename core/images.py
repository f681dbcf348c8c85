"""Image conversions and grids shared by training samples, evaluation, export and the report."""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_pixels(images_uint8):
    """uint8 NHWC tensor -> float NCHW in [-1, 1] (what the VAE takes)."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_pil(x) -> Image.Image:
    """One float CHW tensor in [-1, 1] -> a PIL image."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def image_grid(images: list, cols: int | None = None, labels: list[str] | None = None) -> Image.Image:
    """Tiles images (PIL or uint8 HWC arrays) into one grid, optionally with a caption strip under each."""
    from PIL import ImageDraw

    images = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    strip = 12 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(im, (x, y))
        if labels:
            draw.text((x + 1, y + h), labels[i][: max(4, w // 6)], fill="black")
    return grid
