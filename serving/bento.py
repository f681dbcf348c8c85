"""``t2i bento EXPORT_DIR``: builds the Bento that serves an export dir's selected variant.

The Bento must carry the model, and only the variant it serves (an export dir holds every
variant), so the build runs in a fresh build context: the code packages, ``bentofile.yaml`` and
``artifact/`` = the manifest plus the one variant folder. ``bentoml containerize TAG`` then makes
the OCI image (it needs Docker).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "export", "serving")  # what serving imports; a test checks nothing else is needed
CUDA_VERSION = "12.6"  # the CUDA base image of a GPU export's container (a version BentoML knows; torch's default wheels)


def stage(export_dir: str | Path, ctx: Path, variant: str | None = None) -> str:
    """Writes the build context under ``ctx``; returns the variant it carries."""
    from export.manifest import read_manifest, write_manifest

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    name, entry = manifest.variant(variant, export_dir)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, ctx / pkg, ignore=ignore)
    _bentofile(ROOT / "bentofile.yaml", ctx / "bentofile.yaml", manifest.device)
    art = ctx / "artifact"
    shutil.copytree(export_dir / entry.dir, art / entry.dir, ignore=ignore)
    for extra in ("bench.md", "bench.png"):
        if (export_dir / extra).exists():
            shutil.copy(export_dir / extra, art / extra)
    bundled = manifest.model_copy(update={"selected": name, "variants": {name: entry},
                                          "bundled_from": str(export_dir.resolve())})
    write_manifest(art / "export.json", bundled)
    return name


def _bentofile(src: Path, dst: Path, device: str | None) -> None:
    """The project's bentofile; for an export made for CUDA, a CUDA base image (``docker.cuda_version``)
    and ``T2I_DEVICE=cuda``, so the container is built for the GPU it was measured on (the service then
    asks BentoML for one GPU, see ``serving.service``)."""
    import yaml

    if device != "cuda":
        shutil.copy(src, dst)
        return
    spec = yaml.safe_load(src.read_text())
    spec.setdefault("docker", {})["cuda_version"] = CUDA_VERSION
    spec["envs"] = [e for e in spec.get("envs", []) if e["name"] != "T2I_DEVICE"] + [
        {"name": "T2I_DEVICE", "value": "cuda"}]
    dst.write_text(yaml.safe_dump(spec, sort_keys=False))


def build(export_dir: str | Path, variant: str | None = None, version: str | None = None) -> dict:
    """Builds the Bento into the local store ($BENTOML_HOME); returns its tag, path and variant."""
    import bentoml

    with tempfile.TemporaryDirectory(prefix="t2i-bento-") as tmp:
        ctx = Path(tmp)
        name = stage(export_dir, ctx, variant)
        bento = bentoml.bentos.build_bentofile(str(ctx / "bentofile.yaml"), build_ctx=str(ctx), version=version)
    return {"tag": str(bento.tag), "path": str(bento.path), "variant": name}
