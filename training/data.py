"""Dataset loading: a Hugging Face ``imagefolder`` (images + ``metadata.jsonl`` with ``file_name``,
``text``, extra columns allowed) or a hub dataset id, decoded into memory as uint8 pixels + captions."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from core.errors import UserError

@dataclass
class LoadedImages:
    pixels: np.ndarray  # uint8, N x H x W x 3
    captions: list[str]
    skipped: int
    rows: list[dict]


def load_imagefolder(path: str, resolution: int, image_column: str = "image",
                     caption_column: str = "text", on_bad_image: str = "skip") -> LoadedImages:
    """Loads an imagefolder (local) or hub dataset into memory as uint8 pixels + captions.

    Images are decoded here rather than by ``datasets`` so one broken file is counted and skipped
    (``on_bad_image='skip'``) or reported by name (``'error'``) instead of failing mid-epoch.
    """
    import datasets
    from datasets import Image as ImageFeature

    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise UserError(f"dataset path {path} is not a folder")
        if not any(local.iterdir()):
            raise UserError(f"dataset folder {path} is empty")
        if not (local / "metadata.jsonl").exists():
            raise UserError(f"dataset folder {path} has no metadata.jsonl "
                            "(imagefolder layout: images + metadata.jsonl with file_name and text)")
        _check_metadata(local / "metadata.jsonl", caption_column)
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("imagefolder", data_dir=str(local), split="train")
    elif "/" in path and not path.startswith((".", "/")):
        try:
            ds = datasets.load_dataset(path, split="train")
        except Exception as e:  # offline or no such dataset
            raise UserError(f"could not load dataset {path!r} from the hub: {e}") from None
    else:
        raise UserError(f"dataset folder {path} does not exist")
    for col in (image_column, caption_column):
        if col not in ds.column_names:
            raise UserError(f"dataset has no column {col!r}; columns: {ds.column_names}")
    ds = ds.cast_column(image_column, ImageFeature(decode=False))
    pixels, captions, rows, skipped = [], [], [], 0
    for row in tqdm(ds, desc="decoding images", unit="img", leave=False):
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"a row has no caption in column {caption_column!r}")
        try:
            img = _decode(row[image_column], resolution)
        except Exception as e:
            if on_bad_image == "error":
                raise UserError(f"image {row[image_column].get('path')} cannot be decoded: {e}") from None
            skipped += 1
            continue
        pixels.append(img)
        captions.append(caption)
        rows.append({k: v for k, v in row.items() if k != image_column})
    if not pixels:
        raise UserError(f"no decodable images in {path} ({skipped} failed)")
    return LoadedImages(np.stack(pixels), captions, skipped, rows)


def _check_metadata(meta: Path, caption_column: str) -> None:
    with open(meta) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{meta}:{i} is not valid JSON") from None
            if "file_name" not in row:
                raise UserError(f"{meta}:{i} has no file_name")
            cap = row.get(caption_column)
            if not isinstance(cap, str) or not cap.strip():
                raise UserError(f"{meta}:{i} ({row['file_name']}) has no caption in {caption_column!r}")


def _decode(image: dict, resolution: int) -> np.ndarray:
    import io

    src = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)  # centre crop to a square, then resize
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != resolution:
            im = im.resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()
