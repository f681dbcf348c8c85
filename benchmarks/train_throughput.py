"""Training throughput of the `tiny` preset at batch 16 on this machine, written as JSON.

Compares, in one run (ratios are what to read on a shared, noisy machine):
  cache on  (latents + text embeddings computed once; VAE and text encoder frozen)
  cache off (VAE encode + text encode every step)
  fp32 vs bf16 autocast (cache on)

    .venv/bin/python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from core.config import load_config  # noqa: E402
from synthetic.dataset import generate_dataset  # noqa: E402
from training.presets import build_preset  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import setup, train_step  # noqa: E402


def measure(model: Path, data: Path, work: Path, name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each setting gets its own mixed-precision state
    cfg = load_config(TrainConfig, None, [
        f"model.pretrained={model}", f"data.path={data}", f"output_dir={work / name}", "train.batch_size=16",
        f"train.max_steps={steps + warmup}", "train.warmup_steps=0", *overrides])
    run = setup(cfg)
    for m in run.trainable:
        m.train()
    times = []
    for micro in range(steps + warmup):
        t0 = time.perf_counter()
        train_step(run, micro)
        if micro >= warmup:
            times.append(time.perf_counter() - t0)
    run.acc.end_training()
    med = statistics.median(times)
    return {"name": name, "overrides": overrides, "steps_timed": steps, "median_step_s": round(med, 4),
            "images_per_s": round(16 / med, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json", help="JSON output")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_preset("tiny", work / "tiny")
        data = generate_dataset(work / "data", n=512, seed=0)
        settings = [("cache_fp32", ["train.cache=true", "train.mixed_precision=no"]),
                    ("nocache_fp32", ["train.cache=false", "train.mixed_precision=no"]),
                    ("cache_bf16", ["train.cache=true", "train.mixed_precision=bf16"]),
                    ("nocache_bf16", ["train.cache=false", "train.mixed_precision=bf16"])]
        results = {n: measure(model, data, work, n, o, args.steps, args.warmup) for n, o in settings}
    r = {k: v["images_per_s"] for k, v in results.items()}
    out = {
        "benchmark": "train_throughput", "preset": "tiny", "batch_size": 16, "resolution": 64,
        "what": "full UNet, VAE and text encoder frozen", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "results": results,
        "ratios": {"cache_speedup_fp32": round(r["cache_fp32"] / r["nocache_fp32"], 2),
                   "cache_speedup_bf16": round(r["cache_bf16"] / r["nocache_bf16"], 2),
                   "bf16_speedup_cached": round(r["cache_bf16"] / r["cache_fp32"], 2)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["ratios"], indent=2))
    for k, v in results.items():
        print(f"{k:14s} {v['images_per_s']:7.1f} img/s  ({v['median_step_s'] * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
