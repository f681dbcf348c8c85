"""Checkpoints: accelerate states written atomically, found by step, resumed exactly.

A checkpoint folder is ``checkpoint-<step>`` holding accelerate's state (model, optimizer, LR
schedule, RNG, EMA) and ``train_state.json``; it is written under a ``.tmp`` name and renamed
when complete, so an interrupted save never looks like a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from core.errors import UserError
from core.io import write_json


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    return sorted(p for p in Path(ckpt_dir).glob("checkpoint-*")
                  if not p.name.endswith((".tmp", ".old")) and (p / "train_state.json").exists())


def find_checkpoint(ckpt_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint ``resume_from`` names: a folder, or 'latest' (None when there is none yet)."""
    if not resume_from:
        return None
    if resume_from != "latest":
        p = Path(resume_from)
        if not (p / "train_state.json").exists():
            raise UserError(f"checkpoint {resume_from} does not exist or is incomplete")
        return p
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def save_checkpoint(run) -> Path:
    """accelerate state under a .tmp name, renamed when complete; then prune old ones."""
    acc = run.acc
    final = run.ckpt_dir / f"checkpoint-{run.global_step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(tmp / "train_state.json", {"global_step": run.global_step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        limit = run.cfg.checkpoint.total_limit
        if limit:
            for old in complete_checkpoints(run.ckpt_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def resume(run, checkpoint: Path) -> None:
    """Restores everything accelerate saved, and the step."""
    try:
        run.acc.load_state(str(checkpoint))
        run.global_step = json.loads((checkpoint / "train_state.json").read_text())["global_step"]
    except Exception as e:
        raise UserError(f"checkpoint {checkpoint} is corrupt or does not match this config ({e}); "
                        "delete it to resume from an earlier one") from None
    run.acc.print(f"resumed from {checkpoint} at step {run.global_step}")


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
