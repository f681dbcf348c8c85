"""Variant folders an export can keep from an earlier export into the same ``--out``.

Each built folder carries ``build.json``: its build key (what it was made from: the model's files,
the device, the variant, the export settings its build reads, the code of ``core/`` and ``export/``
and the library versions) and a content hash of its files. A later export into the same ``--out``
keeps a folder whose key is the one it would build now and whose files are unchanged, instead of
building it again (an ONNX export of an SD1.5-size UNet takes minutes). So changing the gate (seed,
images, budget) re-benchmarks without rebuilding, and an interrupted export resumes with the
variants it had finished. ``rebuild=true`` builds every folder afresh.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib import metadata
from pathlib import Path

from core.errors import UserError
from core.io import dir_digest, sha256_file, write_json
from export import trust

BUILD_FILE = "build.json"
LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "torchao",
             "bitsandbytes", "triton", "t2i-sprint")
ROOT = Path(__file__).resolve().parents[1]


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    """Content hash of a variant folder's files, ``build.json`` itself left out."""
    return dir_digest(folder, exclude=(BUILD_FILE,))


def common_inputs(model_dir: Path, device: str) -> dict:
    """What every variant of this export is built from: the model's files, the device, our code and
    the libraries' versions (a new torch or ONNX Runtime may build a different graph)."""
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    code = {p.relative_to(ROOT).as_posix(): sha256_file(p)
            for pkg in ("core", "export") for p in sorted((ROOT / pkg).rglob("*.py"))}
    if device == "cuda":  # kernels and compiled code are made for one GPU
        import torch

        device = f"cuda: {torch.cuda.get_device_name()} (sm {'.'.join(map(str, torch.cuda.get_device_capability()))})"
    return {"model": dir_digest(model_dir), "device": device, "code": _hash_json(code),
            "versions": versions}


def build_inputs(name: str, ctx: dict) -> dict:
    """What a variant's build reads from the export besides the model: the batch sizes (compiled variants
    warm them up), int8-static's calibration prompts, steps and guidance, and the build key of the
    variant it was copied or converted from in this export (an approximation's base; onnx-fp32 for the
    other ONNX precisions)."""
    inputs: dict = {"batch_sizes": ctx["batch_sizes"]}
    if "int8-static" in name:
        inputs.update(calibration=ctx["calibration_prompts"], overlap=ctx.get("calibration_overlap"),
                      steps=ctx["steps"], guidance=ctx["guidance"])
    base = name.split("+")[0]
    sources = {base} if base != name else set()
    if name.startswith("onnx-") and base != "onnx-fp32":
        sources.add("onnx-fp32")
    inputs["from"] = {n: ctx["keys"][n] for n in sorted(sources) if n in ctx["keys"]}
    return inputs


def made_from(common: dict, name: str, ctx: dict) -> dict:
    """Everything variant ``name``'s folder is made from; its build key is this dict's hash."""
    return {**common, "variant": name, "settings": build_inputs(name, ctx)}


def key_of(inputs: dict) -> str:
    return _hash_json(inputs)


def record(folder: Path, inputs: dict, build_s: float, notes: dict) -> None:
    """Writes ``build.json`` into a finished folder (before it is moved into place)."""
    write_json(Path(folder) / BUILD_FILE, {"key": key_of(inputs), "made_from": inputs,
                                           "built": time.strftime("%Y-%m-%d %H:%M:%S"), "build_s": build_s,
                                           "notes": notes, "digest": folder_digest(folder)})


WHAT = {"model": "the model's files", "device": "the device", "code": "t2i-sprint's code",
        "versions": "library versions", "variant": "the variant", "settings": "settings its build reads"}


def reusable(folder: Path, inputs: dict) -> tuple[dict | None, str | None]:
    """(its recorded build {build_s, notes, built}, None) when ``folder`` was built from ``inputs`` and its
    files are the ones it was built with (none missing, added or changed); else (None, why not), or
    (None, None) when there is no such folder. build.json is read as JSON."""
    path = Path(folder) / BUILD_FILE
    if not path.is_file():
        return None, None
    try:
        rec = json.loads(path.read_text())
        if rec.get("key") != key_of(inputs):
            old = rec.get("made_from") if isinstance(rec.get("made_from"), dict) else {}
            changed = [WHAT[k] for k in WHAT if old.get(k) != inputs.get(k)]
            return None, f"changed since: {', '.join(changed) or 'its build key'}"
        if not isinstance(rec.get("notes"), dict) or rec.get("digest") != folder_digest(folder):
            return None, "its files changed since it was built"
        try:
            trust.check(folder, trusted=False)  # code it ships (compiled kernels) runs only if built here
        except UserError:
            return None, "the code it ships was not built on this machine"
        from export.variants import check_folder

        try:
            check_folder(_variant(Path(folder).name), folder)  # int8-static: compiled for this CPU and torch?
        except UserError:
            return None, "it was compiled for another CPU or torch"
        return {"build_s": float(rec["build_s"]), "notes": rec["notes"], "built": str(rec.get("built"))}, None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None, f"its {BUILD_FILE} is unreadable"


def _variant(name: str):
    """The registry entry named ``name``, or None."""
    from export.variants import get

    try:
        return get(name)
    except UserError:
        return None


def _is_variant_name(name: str) -> bool:
    return _variant(name) is not None


def remove_stale(out: Path, keep: set[str]) -> list[str]:
    """Removes the variant folders of an earlier export into ``out`` (named as a variant, with a
    ``build.json``) that the new manifest does not list; nothing else in ``out`` is touched (a copy
    such as ``onnx-int8.bak`` stays). Their names."""
    gone = [d.name for d in sorted(Path(out).iterdir()) if d.is_dir() and d.name not in keep
            and (d / BUILD_FILE).is_file() and _is_variant_name(d.name)]
    for name in gone:
        shutil.rmtree(Path(out) / name, ignore_errors=True)
    return gone
