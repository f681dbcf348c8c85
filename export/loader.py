"""The public loader: serving (and anyone else) loads an export dir's variant through here.

    from export.loader import load
    gen = load("runs/demo/export")            # the selected variant
    images = gen.generate([GenerationRequest("a red circle on the left", seed=1)])
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import UserError


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / "export.json"
    if not path.is_file():
        raise UserError(f"{export_dir} is not an export dir (no export.json); create one with `t2i export`")
    return json.loads(path.read_text())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(export_dir: str | Path, variant: str | None = None, device: str | None = None):
    """Loads ``variant`` (default: the manifest's selected one) from disk; returns a Generator."""
    from export.variants import get

    manifest = read_manifest(export_dir)
    name = variant or manifest.get("selected")
    if not name:
        raise UserError(f"{export_dir}/export.json selects no variant; pass one of "
                        f"{[n for n, v in manifest['variants'].items() if v['status'] == 'ok']}")
    entry = manifest["variants"].get(name)
    if entry is None or entry.get("status") != "ok":
        why = entry.get("reason") if entry else "not in the manifest"
        raise UserError(f"variant {name} cannot be loaded from {export_dir}: {why}")
    gen = get(name).load(Path(export_dir) / entry["dir"], device or manifest.get("device") or default_device())
    gen.info = {**gen.info, "variant": name, "export_dir": str(export_dir), "bench": entry.get("bench", {}),
                "quality": entry.get("quality", {})}
    return gen
