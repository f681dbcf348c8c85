"""Atomic writes: a file or folder appears whole or not at all (temp + fsync + rename).

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


def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)
    return path


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
    _fsync_dir(final.parent)


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
