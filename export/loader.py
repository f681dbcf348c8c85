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


def check(export_dir: str | Path, variant: str | None = None, trusted: bool = False) -> tuple[str, str | None]:
    """(variant name, what code it ships and why that may run, or None when it ships none), without
    loading anything; a UserError line when the variant cannot load or its code is not trusted."""
    from export import trust

    name, entry = read_manifest(export_dir).variant(variant, export_dir)
    return name, trust.check(Path(export_dir) / entry.dir, trusted)


def load(export_dir: str | Path, variant: str | None = None, device: str | None = None, trusted: bool = False):
    """Loads ``variant`` (default: the manifest's selected one) from disk; returns a Generator.
    Weights load as data; a variant that ships code (the compile variant's Inductor cache) loads only
    when that code was built on this machine or ``trusted`` is set (see ``export.trust``)."""
    from export.variants import get

    manifest = read_manifest(export_dir)
    name, entry = manifest.variant(variant, export_dir)
    gen = get(name).load(Path(export_dir) / entry.dir, device or manifest.device or default_device(), trusted=trusted)
    gen.info = {**gen.info, "variant": name,
                "bench": entry.bench.model_dump(mode="json") if entry.bench else {},
                "quality": entry.quality.model_dump(mode="json") if entry.quality else {}}
    return gen
