"""The public loader: serving (and anyone else) loads an export dir's variant through here.

    from export.loader import load
    gen = load("runs/demo/export")            # the selected variant
    images = gen.generate([GenerationRequest("a red circle on the left", seed=1)])
"""
from __future__ import annotations

from pathlib import Path

from export.manifest import read_manifest


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(export_dir: str | Path, variant: str | None = None, device: str | None = None):
    """Loads ``variant`` (default: the manifest's selected one) from disk; returns a Generator."""
    from export.variants import get

    manifest = read_manifest(export_dir)
    name, entry = manifest.variant(variant, export_dir)
    gen = get(name).load(Path(export_dir) / entry.dir, device or manifest.device or default_device())
    gen.info = {**gen.info, "variant": name, "export_dir": str(export_dir),
                "bench": entry.bench.model_dump(mode="json") if entry.bench else {},
                "quality": entry.quality.model_dump(mode="json") if entry.quality else {}}
    return gen
