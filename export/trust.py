"""Folders that ship code run it only when trusted.

Weights are data (safetensors, ONNX) and load with no code of the folder's running. The exceptions
are the compile variant's Inductor cache (pickled graphs and compiled kernels) and int8-static's
AOTInductor package (a compiled shared library): loading them runs what they hold. So build writes a
hash manifest (``code.json``) beside such files and records their hashes in this user's trust store
(``<cache>/trusted-artifacts.json``); loading verifies the hashes and runs the files only when they
were built on this machine or the user says ``--trusted-artifacts`` (``T2I_TRUSTED_ARTIFACTS=true``)
for a folder from elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path, PurePosixPath

from core.errors import UserError
from core.io import atomic_write, cache_home, read_json_file, sha256_file, write_json

CODE_MANIFEST = "code.json"
STORE = "trusted-artifacts.json"


def _store_path() -> Path:
    return cache_home() / STORE


def _trusted_hashes() -> set[str]:
    path = _store_path()
    if not path.is_file():
        return set()
    try:
        return set(json.loads(path.read_text()).get("sha256", {}))
    except (OSError, ValueError, AttributeError):
        return set()  # an unreadable store trusts nothing; the next build rewrites it


def record(var_dir: Path, files: list[str], kind: str) -> None:
    """At build: writes the hash manifest of ``files`` (in ``var_dir``) and trusts them on this machine."""
    entries = {name: {"sha256": sha256_file(var_dir / name), "bytes": (var_dir / name).stat().st_size}
               for name in files}
    write_json(var_dir / CODE_MANIFEST, {"kind": kind, "files": entries})
    path = _store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = json.loads(path.read_text()) if path.is_file() else {}
        known = dict(store.get("sha256", {}))
    except (OSError, ValueError, AttributeError):
        known = {}
    for e in entries.values():
        known[e["sha256"]] = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_write(path, json.dumps({"sha256": known}, indent=1))


def _manifest(var_dir: Path) -> dict | None:
    path = var_dir / CODE_MANIFEST
    if not path.exists():
        return None
    data = read_json_file(path, "code manifest", "rebuild the variant with `t2i export`")
    files, kind = data.get("files"), data.get("kind")
    ok = isinstance(files, dict) and isinstance(kind, str) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and PurePosixPath(n).name == n
        and n not in ("", ".", "..") for n, e in files.items())
    if not ok:
        raise UserError(f"code manifest {path} is corrupt (not a list of files with hashes); rebuild the variant")
    return data


def verified_bytes(var_dir: Path, name: str, trusted: bool) -> bytes:
    """The bytes of code-bearing file ``name``, read once and checked against the folder's hash
    manifest and the trust rules; a UserError line when it is not listed, altered or not trusted."""
    var_dir = Path(var_dir)
    manifest = _manifest(var_dir)
    if manifest is None or name not in manifest["files"]:
        raise UserError(f"{var_dir / name} is not listed in a hash manifest ({CODE_MANIFEST}), so it is not "
                        "loaded (it would run as code); rebuild the variant with `t2i export`")
    data = (var_dir / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
        raise UserError(f"{var_dir / name} does not match the hash in {CODE_MANIFEST}: it changed after it was "
                        "built, so it is not loaded; rebuild the variant with `t2i export`")
    _require_trust(var_dir, manifest, trusted)
    return data


def _require_trust(var_dir: Path, manifest: dict, trusted: bool) -> str:
    if all(e["sha256"] in _trusted_hashes() for e in manifest["files"].values()):
        return "built on this machine"
    if trusted:
        return "trusted with --trusted-artifacts"
    raise UserError(f"{var_dir} ships {manifest['kind']} ({', '.join(manifest['files'])}), which runs as code "
                    "when loaded, and was not built on this machine; load it only if you trust where it came "
                    "from, with --trusted-artifacts (T2I_TRUSTED_ARTIFACTS=true), or rebuild it with `t2i export`")


def check(var_dir: Path, trusted: bool) -> str | None:
    """None when the folder ships no code; else one line saying what code it runs and why that is
    allowed. Raises UserError (one line) when the code is altered or not trusted."""
    var_dir = Path(var_dir)
    manifest = _manifest(var_dir)
    if manifest is None:
        return None
    for name, e in manifest["files"].items():
        if not (var_dir / name).is_file() or sha256_file(var_dir / name) != e["sha256"]:
            raise UserError(f"{var_dir / name} does not match the hash in {CODE_MANIFEST}; rebuild the variant")
    why = _require_trust(var_dir, manifest, trusted)
    return f"runs the {manifest['kind']} it ships ({why})"
