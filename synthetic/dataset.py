"""Renders the synthetic world as a Hugging Face ``imagefolder`` dataset (images + ``metadata.jsonl``
with ``file_name``, ``text`` and the ground-truth attributes), deterministically from a seed."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm.auto import tqdm

from core.errors import UserError
from core.io import atomic_dir
from synthetic.world import WorldSpec, caption_scene, render_scene, sample_scene

SPEC_FILE = ".t2i-synthetic.json"  # hidden: imagefolder loading skips it


def _spec_record(n: int, seed: int, size: int, spec: WorldSpec) -> dict:
    return {"n": n, "seed": seed, "size": size, "exclude": sorted(spec.exclude), "focus": sorted(spec.focus),
            "focus_fraction": spec.focus_fraction, "max_shapes": spec.max_shapes,
            # only when set, so that folders rendered before these settings existed still match
            **({"contrast": sorted(spec.contrast), "contrast_fraction": spec.contrast_fraction}
               if spec.contrast else {})}


def synthetic_spec_matches(folder: str | Path, n: int, seed: int, size: int, spec: WorldSpec) -> bool | None:
    """Whether a folder rendered by ``generate_dataset`` was rendered with these settings; None when
    the folder was not rendered by it (a user's own data, or one from before the record existed)."""
    rec = Path(folder) / SPEC_FILE
    if not rec.exists():
        return None
    try:
        return json.loads(rec.read_text()) == _spec_record(n, seed, size, spec)
    except (OSError, ValueError):
        return False


def generate_dataset(out: str | Path, n: int, seed: int = 0, size: int = 64,
                     spec: WorldSpec | None = None, overwrite: bool = False) -> Path:
    """Writes ``n`` images + ``metadata.jsonl`` (imagefolder layout) deterministically from ``seed``.

    The folder appears whole or not at all: it is written under a temporary name and renamed. A
    hidden ``SPEC_FILE`` records what was asked for (see ``synthetic_spec_matches``).
    """
    spec = spec or WorldSpec()
    out = Path(out)
    if n < 1:
        raise UserError("--n must be at least 1")
    if size < 16 or size % 16:
        raise UserError(f"image size {size} must be a multiple of 16 and at least 16")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty (use --overwrite to replace it)")
    rng = random.Random(seed)
    with atomic_dir(out) as tmp, open(tmp / "metadata.jsonl", "w") as meta:
        for i in tqdm(range(n), desc=f"rendering {out.name}", unit="img", leave=False):
            scene = sample_scene(rng, spec)
            img = render_scene(scene, size, random.Random(rng.random()))
            name = f"{i:06d}.png"
            img.save(tmp / name)
            row = {"file_name": name, "text": caption_scene(scene, rng), **scene}
            meta.write(json.dumps(row) + "\n")
        (tmp / SPEC_FILE).write_text(json.dumps(_spec_record(n, seed, size, spec), sort_keys=True))
    return out
