"""Datasets as users have them, decoded into memory as uint8 pixels + captions.

A local folder holds images of any size, mode and orientation, with captions from (first found)
``metadata.jsonl`` (Hugging Face imagefolder: ``file_name`` + caption column, extra columns
allowed), ``metadata.csv`` (the same columns), or kohya-style side-car files (``x.png`` +
``x.txt`` / ``x.caption``). A hub dataset id works too where the machine is online.
Each image is EXIF-rotated, converted to RGB (grayscale, palette, RGBA on white, 16-bit scaled),
cropped to a square (centre, or a seeded random crop) and resized to the training resolution.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SIDECAR_SUFFIXES = (".txt", ".caption")


@dataclass
class LoadedImages:
    pixels: np.ndarray  # uint8, N x H x W x 3
    captions: list[str]
    skipped: int
    rows: list[dict]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height) of each kept image


# ------------------------------------------------------------------------------------------ captions

def _jsonl_rows(meta: Path, caption_column: str) -> list[dict]:
    rows = []
    try:
        lines = meta.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{meta} is not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{meta}:{i} is not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{meta}:{i} must be a JSON object with file_name and {caption_column!r}")
        rows.append(row)
    return rows


def _csv_rows(meta: Path) -> list[dict]:
    try:
        with open(meta, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"{meta} is not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"{meta} is not a valid CSV file ({e})") from None


def _sidecar_rows(folder: Path, caption_column: str) -> list[dict]:
    rows = []
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        cap = next((img.with_suffix(s) for s in SIDECAR_SUFFIXES if img.with_suffix(s).is_file()), None)
        text = cap.read_text(errors="replace").strip() if cap else None
        rows.append({"file_name": str(img.relative_to(folder)), caption_column: text})
    return rows


def caption_rows(folder: Path, caption_column: str = "text") -> tuple[list[dict], str]:
    """The dataset's rows ({file_name, caption, extra columns}) and where the captions came from."""
    if (folder / "metadata.jsonl").is_file():
        rows, source = _jsonl_rows(folder / "metadata.jsonl", caption_column), "metadata.jsonl"
    elif (folder / "metadata.csv").is_file():
        rows, source = _csv_rows(folder / "metadata.csv"), "metadata.csv"
    else:
        rows, source = _sidecar_rows(folder, caption_column), "side-car .txt/.caption files"
        if not rows:
            raise UserError(f"dataset folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if all(r[caption_column] is None for r in rows):
            raise UserError(f"dataset folder {folder} has images but no captions: add metadata.jsonl "
                            "(file_name + text per line), metadata.csv, or a side-car x.txt per image x.png")
    for i, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise UserError(f"{folder / source}: row {i} has no file_name")
        cap = row.get(caption_column)
        if not isinstance(cap, str) or not cap.strip():
            raise UserError(f"{row['file_name']} has no caption in {caption_column!r} ({source})")
    return rows, source


# ------------------------------------------------------------------------------------------ images

def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, 16-bit scaled, alpha composited on white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray((arr / hi * 255).round().clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA"))
    return im.convert("RGB")


def square(im: Image.Image, resolution: int, crop: str = "center", rng: random.Random | None = None) -> np.ndarray:
    """Crops to a square (centre, or random along the long side) and resizes to ``resolution``."""
    w, h = im.size
    s = min(w, h)
    if crop == "random" and rng is not None:
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    else:
        x, y = (w - s) // 2, (h - s) // 2
    im = im.crop((x, y, x + s, y + s))
    if s != resolution:
        im = im.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).copy()


def decode(src, resolution: int, crop: str = "center", rng: random.Random | None = None) -> tuple[np.ndarray, tuple]:
    with Image.open(src) as im:
        rgb = to_rgb(im)
        return square(rgb, resolution, crop, rng), rgb.size


# ------------------------------------------------------------------------------------------ loading

def sample_rows(n: int, max_rows: int | None) -> list[int] | None:
    """Which of ``n`` rows to keep under a cap: a fixed random sample (seed 0) in the rows' order, so
    that a folder sorted by class or holding every image twice (flipped copies) is still represented;
    None (all of them) when they fit."""
    if max_rows is None or n <= max_rows:
        return None
    return sorted(random.Random(0).sample(range(n), max_rows))


def dataset_rows(path: str, image_column: str = "image", caption_column: str = "text",
                 max_rows: int | None = None):
    """(image source, name, row) of a local dataset folder or a hub dataset id, images not decoded;
    at most ``max_rows`` of them (``sample_rows``). A missing, empty or uncaptioned local folder is a
    UserError here; a hub dataset's rows are read (and checked) as they are iterated."""
    local = Path(path)
    if not dataset_exists(path):
        return _hub_rows(path, image_column, caption_column, max_rows)
    if not local.is_dir():
        raise UserError(f"dataset path {path} is not a folder")
    if not any(local.iterdir()):
        raise UserError(f"dataset folder {path} is empty")
    rows = [(local / r["file_name"], r["file_name"], r) for r in caption_rows(local, caption_column)[0]]
    keep = sample_rows(len(rows), max_rows)
    return rows if keep is None else [rows[i] for i in keep]


def load_imagefolder(path: str, resolution: int, image_column: str = "image", caption_column: str = "text",
                     on_bad_image: str = "skip", crop: str = "center", seed: int = 0,
                     max_rows: int | None = None) -> LoadedImages:
    """Loads a local dataset folder (or a hub dataset id) into memory.

    One broken image is counted and skipped (``on_bad_image='skip'``) or reported by name
    (``'error'``) instead of failing mid-epoch. ``max_rows``: decode at most that many rows (see
    ``sample_rows``).
    """
    rows = dataset_rows(path, image_column, caption_column, max_rows)
    rng = random.Random(seed)
    pixels, captions, kept, sizes, skipped = [], [], [], [], 0
    for src, name, row in tqdm(rows, desc="decoding images", unit="img", leave=False):
        try:
            img, size = decode(src, resolution, crop, rng)
        except Exception as e:
            if on_bad_image == "error":
                raise UserError(f"image {name} cannot be decoded: {e}") from None
            skipped += 1
            continue
        pixels.append(img)
        captions.append(row[caption_column])
        kept.append({k: v for k, v in row.items() if k != image_column})
        sizes.append(size)
    if not pixels:
        raise UserError(f"no decodable images in {path} ({skipped} failed)")
    return LoadedImages(np.stack(pixels), captions, skipped, kept, sizes)


def dataset_captions(path: str, image_column: str = "image", caption_column: str = "text") -> list[str]:
    """Every caption of a local dataset folder or a hub dataset id, no image decoded or iterated: of a
    hub dataset, its caption column alone (not every row with its image bytes)."""
    if not Path(path).exists() and _is_hub_id(path):
        ds = _hub_dataset(path, image_column, caption_column)
        captions = ds.with_format("arrow")[caption_column].to_pylist()  # honours a selection of rows
        for i, c in enumerate(captions):
            _check_caption(c, caption_column, f"row {i}")
        return captions
    return [row[caption_column] for _, _, row in dataset_rows(path, image_column, caption_column)]


def dataset_exists(path: str) -> bool:
    """True for a local path, False for a hub dataset id; anything else is a UserError."""
    if Path(path).exists():
        return True
    if _is_hub_id(path):
        return False
    raise UserError(f"dataset folder {path} does not exist")


def _is_hub_id(path: str) -> bool:
    return "/" in path and not path.startswith((".", "/"))


def _check_caption(caption, caption_column: str, row: str = "a row") -> None:
    if not isinstance(caption, str) or not caption.strip():
        raise UserError(f"{row} has no caption in column {caption_column!r}")


@functools.lru_cache(maxsize=2)
def _hub_split(path: str):
    """A hub dataset's train split, loaded once per process: the references' captions and then their
    images read the same split (each ``load_dataset`` asks the hub for the latest revision when online)."""
    import datasets

    return datasets.load_dataset(path, split="train")


def _hub_dataset(path: str, image_column: str, caption_column: str):
    """A hub dataset's train split (downloaded once into the datasets cache), both columns checked."""
    try:
        ds = _hub_split(path)
    except Exception as e:  # offline or no such dataset
        raise UserError(f"could not load dataset {path!r} from the hub: {e}") from None
    for col in (image_column, caption_column):
        if col not in ds.column_names:
            raise UserError(f"dataset has no column {col!r}; columns: {ds.column_names}")
    return ds


def _hub_rows(path: str, image_column: str, caption_column: str, max_rows: int | None = None):
    """(image source, name, row) of a hub dataset, images left encoded."""
    from datasets import Image as ImageFeature

    ds = _hub_dataset(path, image_column, caption_column)
    keep = sample_rows(len(ds), max_rows)
    if keep is not None:
        ds = ds.select(keep)
    for row in ds.cast_column(image_column, ImageFeature(decode=False)):
        _check_caption(row[caption_column], caption_column)
        image = row[image_column]
        yield io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"], image.get("path"), row


def summary(data: LoadedImages, tokenizer=None, max_pieces: int = 3) -> dict:
    """What a user should see before training: count, sizes, caption lengths, and the words the
    tokenizer splits into many pieces (words it probably never saw)."""
    widths = [w for w, _ in data.sizes] or [data.pixels.shape[2]]
    heights = [h for _, h in data.sizes] or [data.pixels.shape[1]]
    words = [len(c.split()) for c in data.captions]
    out = {"images": len(data.captions), "skipped": data.skipped,
           "width": [min(widths), max(widths)], "height": [min(heights), max(heights)],
           "caption_words": [min(words), round(float(np.mean(words)), 1), max(words)],
           "unique_captions": len(set(data.captions))}
    if tokenizer is not None:
        vocab = Counter(w for c in data.captions for w in re.findall(r"[a-z0-9']+", c.lower()))
        special = set(tokenizer.all_special_ids)
        split = {w: n for w, n in vocab.items() if len([i for i in tokenizer(w).input_ids if i not in special]) > max_pieces}
        out["words_split_in_many_pieces"] = sorted(split, key=lambda w: -split[w])[:20]
    return out


def format_summary(s: dict) -> str:
    line = (f"dataset: {s['images']} images ({s['skipped']} skipped), sizes {s['width'][0]}-{s['width'][1]} x "
            f"{s['height'][0]}-{s['height'][1]} px, caption words min/mean/max {s['caption_words'][0]}/"
            f"{s['caption_words'][1]}/{s['caption_words'][2]}, {s['unique_captions']} distinct captions")
    if s.get("words_split_in_many_pieces"):
        line += ("\n  words the tokenizer splits into many pieces (likely new to the model): "
                 + ", ".join(s["words_split_in_many_pieces"]))
    return line
