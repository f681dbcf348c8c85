"""Checkpoints: everything a run needs to continue exactly, kept as data (safetensors + JSON), so
resuming a checkpoint never unpickles anything.

    checkpoint-<step>/
      model_<i>.safetensors     the weights of each trained module (UNet, text encoder, VAE)
      state.safetensors         optimizer, LR schedule, EMA, grad scaler: tensors as tensors, the rest
                                (param groups, counters, settings) as JSON in the file's metadata
      rng_<rank>.safetensors    each process's Python / NumPy / torch RNG states
      train_state.json          the step and the size and SHA-256 of every file above

A checkpoint is written under a ``.tmp`` name, fsynced and renamed when complete; train_state.json
comes last, so a folder without it is never a checkpoint. ``latest`` is the newest checkpoint that
reads back whole (every hash matches); a corrupt newer one is passed over with a message. Resuming
from an older checkpoint moves the newer ones (of the run being abandoned) aside into
``checkpoints/abandoned/``, so that ``latest`` cannot return to them later.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.io import fsync_dir, fsync_tree, read_json_file, read_safetensors, sha256_file, write_json

FORMAT = 2  # 1: accelerate's save_state (pickles), no longer read
STATE_FILE = "train_state.json"
ABANDONED = "abandoned"


# ------------------------------------------------------------------ nested state <-> tensors + JSON

def split_tensors(obj, tensors: dict, prefix: str = "t"):
    """``obj`` (dicts, lists, tuples, tensors, arrays, numbers, strings) as JSON, with every tensor
    moved into ``tensors`` under a generated key and referenced by it."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[k, split_tensors(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, prefix) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def join_tensors(obj, tensors: dict):
    """The inverse of ``split_tensors``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__items__" in obj:
            return {k: join_tensors(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def _save_state(path: Path, state) -> None:
    """A nested state as one safetensors file: tensors as tensors, the rest as JSON metadata."""
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = split_tensors(state, tensors)
    save_file(tensors, str(path), metadata={"structure": json.dumps(structure)})


def _load_state(path: Path):
    tensors, meta = read_safetensors(path)
    try:
        return join_tensors(json.loads(meta["structure"]), tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} is corrupt (its structure does not read back: {e})") from None


# ------------------------------------------------------------------ RNG

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ finding checkpoints

def _step(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint folders (train_state.json written last), oldest first."""
    return sorted((p for p in Path(ckpt_dir).glob("checkpoint-*")
                   if not p.name.endswith((".tmp", ".old")) and (p / STATE_FILE).exists() and _step(p) >= 0),
                  key=_step)


def find_checkpoint(ckpt_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint folder ``resume_from`` names ('latest': the newest finished one), unread."""
    if not resume_from:
        return None
    if resume_from != "latest":
        p = Path(resume_from)
        if not (p / STATE_FILE).exists():
            raise UserError(f"checkpoint {resume_from} does not exist or is incomplete")
        return p
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def read_checkpoint(path: Path, rank: int = 0) -> dict:
    """Everything in checkpoint ``path``, checked against its hashes and read into memory, as data.
    A missing, truncated, altered or pickled (older format) checkpoint is one UserError line."""
    path = Path(path)
    state = read_json_file(path / STATE_FILE, "checkpoint state")
    if state.get("format") != FORMAT:
        if list(path.glob("*.pkl")) or list(path.glob("*.bin")):
            raise UserError(f"checkpoint {path} was written by an older t2i as pickles, which are never loaded "
                            "(unpickling can run code); start a new run or resume from a newer checkpoint")
        raise UserError(f"checkpoint {path} is corrupt ({STATE_FILE} has no format {FORMAT} record)")
    files = state.get("files")
    if not isinstance(files, dict) or not isinstance(state.get("global_step"), int):
        raise UserError(f"checkpoint {path} is corrupt ({STATE_FILE} lacks its file list or step)")
    for name, e in files.items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise UserError(f"checkpoint {path} is corrupt ({name} is missing)")
        if f.stat().st_size != e.get("bytes") or sha256_file(f) != e.get("sha256"):
            raise UserError(f"checkpoint {path} is corrupt ({name} does not match its recorded size and hash)")
    training = _load_state(path / "state.safetensors")
    if not isinstance(training, dict) or not {"optimizer", "scheduler", "ema", "scaler"} <= set(training):
        raise UserError(f"checkpoint {path} is corrupt (state.safetensors lacks the optimizer or schedule)")
    rng = path / f"rng_{rank}.safetensors"
    return {**training, "global_step": state["global_step"],
            "models": [read_safetensors(path / f"model_{i}.safetensors")[0] for i in range(state.get("models", 0))],
            "rng": _load_state(rng) if rng.is_file() else None}


def choose_checkpoint(ckpt_dir: Path, resume_from: str | None, rank: int = 0, say=print) -> tuple[Path, dict] | None:
    """The checkpoint to resume and its contents: the one ``resume_from`` names, or for 'latest' the
    newest that reads back whole (corrupt newer ones are passed over, saying so). None when
    'latest' finds no checkpoint yet; a UserError when checkpoints exist but none can be read."""
    if not resume_from:
        return None
    if resume_from != "latest":
        path = find_checkpoint(ckpt_dir, resume_from)
        return path, read_checkpoint(path, rank)
    tried = []
    for path in reversed(complete_checkpoints(ckpt_dir)):
        try:
            return path, read_checkpoint(path, rank)
        except UserError as e:
            say(f"warning: skipping {path.name}: {e}")
            tried.append(path.name)
    if tried:
        raise UserError(f"no checkpoint in {ckpt_dir} can be resumed (corrupt: {', '.join(tried)}); delete them "
                        "or set checkpoint.resume_from=null to start over")
    return None


def set_aside_newer(ckpt_dir: Path, chosen: Path) -> list[str]:
    """Moves the checkpoints (finished or not) newer than ``chosen`` into checkpoints/abandoned/<time>/:
    they belong to the run being abandoned, and ``latest`` must not return to them."""
    ckpt_dir, step = Path(ckpt_dir), _step(Path(chosen))
    newer = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and _step(Path(p.name.split(".")[0])) > step]
    if not newer:
        return []
    dest = ckpt_dir / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in newer:
        os.replace(p, dest / p.name)
    fsync_dir(ckpt_dir)
    return sorted(p.name for p in newer)


# ------------------------------------------------------------------ save / resume

def save_checkpoint(run) -> Path:
    """Every process writes its RNG state, the main one the rest; fsynced, then renamed into place."""
    from safetensors.torch import save_file

    acc = run.acc
    final = run.ckpt_dir / f"checkpoint-{run.global_step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    _save_state(tmp / f"rng_{acc.process_index}.safetensors", _rng_state())
    if acc.is_main_process:
        for i, module in enumerate(run.trainable):
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      str(tmp / f"model_{i}.safetensors"))
        scaler = getattr(acc, "scaler", None)
        _save_state(tmp / "state.safetensors", {
            "optimizer": run.optimizer.state_dict(), "scheduler": run.lr_scheduler.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None})
    acc.wait_for_everyone()
    if acc.is_main_process:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        write_json(tmp / STATE_FILE, {"format": FORMAT, "global_step": run.global_step,
                                      "models": len(run.trainable), "files": files})
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        limit = run.cfg.checkpoint.total_limit
        if limit:
            for old in complete_checkpoints(run.ckpt_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def resume(run, checkpoint: Path, state: dict) -> None:
    """Restores weights, optimizer, LR schedule, EMA, RNG and step from a ``read_checkpoint`` result."""
    acc = run.acc
    try:
        if len(state["models"]) != len(run.trainable):
            raise ValueError(f"it holds {len(state['models'])} trained modules, this config trains "
                             f"{len(run.trainable)}")
        for module, weights in zip(run.trainable, state["models"]):
            module.load_state_dict(weights, strict=True)
        run.optimizer.load_state_dict(state["optimizer"])
        run.lr_scheduler.load_state_dict(state["scheduler"])
        if (run.ema is None) != (state["ema"] is None):
            raise ValueError("EMA is on in one and off in the other")
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
        if state["scaler"] is not None and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(state["scaler"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {checkpoint} does not match this config ({str(e).splitlines()[0][:200]}); "
                        "resume it with the config that wrote it") from None
    if state["rng"] is not None:
        _set_rng_state(state["rng"])
    else:
        acc.print(f"warning: {checkpoint} has no RNG state for process {acc.process_index}; the resumed run "
                  "will not repeat the uninterrupted one exactly")
    run.global_step = state["global_step"]
    acc.step = run.global_step * run.cfg.train.grad_accum  # micro-steps so far: keeps accumulation in phase
    acc.print(f"resumed from {checkpoint} at step {run.global_step}")


@contextlib.contextmanager
def ema_weights(run):
    """Swaps the EMA weights in (for sampling / saving) and back out; a no-op without EMA."""
    if run.ema is None:
        yield
        return
    run.ema.store(run.ema_params)
    run.ema.copy_to(run.ema_params)
    try:
        yield
    finally:
        run.ema.restore(run.ema_params)
