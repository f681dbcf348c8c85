"""Atomic writes: a file or folder appears whole or not at all (temp + fsync + rename); and the
data-only reads of what they wrote (JSON, safetensors), where a bad file is one UserError line.

Every artifact the product writes goes through here, so a crash or Ctrl-C never leaves a
half-written model dir, export dir, report or JSON behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from core.errors import UserError


def cache_home() -> Path:
    """The user's t2i-sprint cache: $T2I_CACHE, else $XDG_CACHE_HOME/t2i-sprint (~/.cache/t2i-sprint)."""
    base = os.environ.get("T2I_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                        "t2i-sprint")
    return Path(base)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Writes ``data`` to ``path`` through a temp file in the same folder, then renames it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def fsync_tree(root: str | Path) -> None:
    """Flushes every file under ``root`` and the folders holding them to disk (before a rename
    publishes the folder, so that a power cut cannot leave a renamed folder of empty files)."""
    root = Path(root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(root: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """Content hash of every file under ``root`` (relative names, sizes and bytes), except the relative
    paths in ``exclude``: any file added, removed, renamed or changed changes it."""
    import hashlib

    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if f.relative_to(root).as_posix() in exclude:
            continue
        h.update(f"{f.relative_to(root)}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def read_json_file(path: str | Path, what: str = "file", remedy: str = "") -> dict:
    """A JSON object from ``path``; a missing, unreadable, non-UTF-8, non-JSON or non-object file is
    one UserError line naming the file, what it is and ``remedy``."""
    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist{tail}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}{tail}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is corrupt (not UTF-8 text){tail}") from None
    except ValueError as e:
        raise UserError(f"{what} {path} is corrupt (not valid JSON: {e}){tail}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is corrupt (not a JSON object){tail}")
    return data


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Tensors as safetensors (data only: no code runs when it is read), written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, save(tensors, metadata=metadata))


def read_safetensors(path: str | Path, device: str = "cpu", remedy: str = "") -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file; anything else (missing, truncated, a pickle) is one
    UserError line. Reading runs no code: safetensors is a JSON header plus raw tensor bytes."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    if not path.is_file():
        raise UserError(f"{path} does not exist{tail}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0][:120]}){tail}") from None


def write_json(path: str | Path, obj) -> Path:
    """JSON (indented, non-JSON values as strings), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str))


def save_image(image, path: str | Path) -> Path:
    """A PIL image as PNG, written atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves the finished folder ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    deleted only after the swap, so there is no moment when neither copy exists on disk."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields a temp folder that becomes ``final`` only if the block succeeds (removed otherwise)."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
