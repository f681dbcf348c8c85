"""Benchmarks one variant in a fresh process (so load time, warm-up and peak memory are its own):

    python -m export.bench_worker VAR_DIR NAME PLAN.json OUT.json IMAGES.npy [--device cpu]
    python -m export.bench_worker VAR_DIR NAME PLAN.json OUT.json --timing-only BATCH [--device cpu]

Writes timing JSON and the variant's images for the quality prompts (uint8 NHWC .npy). With
``--timing-only`` it loads the variant, warms up and times BATCH alone (no images): the export's
re-timing rounds, which alternate the close contenders in fresh processes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.sampling import GenerationRequest  # noqa: E402
from export.common import latency_stats  # noqa: E402


def _requests(prompts: list[str], seeds: list[int], plan: dict) -> list[GenerationRequest]:
    return [GenerationRequest(p, num_inference_steps=plan["steps"], guidance_scale=plan["guidance"], seed=s)
            for p, s in zip(prompts, seeds)]


class RssSampler:
    """Peak resident memory of this process while the variant loads and runs, sampled every 5 ms
    from /proc/self/statm. ``ru_maxrss`` cannot tell variants apart: its peak is reached while the
    libraries import (the same for every variant), before any model is loaded."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self.baseline = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def stop(self) -> tuple[float, float]:
        """(peak RSS MB, peak minus the RSS before the variant loaded, MB)."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak / 2**20, (self.peak - self.baseline) / 2**20


def time_batch(gen, plan: dict, b: int) -> dict:
    """``plan["repeats"]`` timed calls at batch ``b`` (after warm-up): seconds per image."""
    per_image, gen.unet_time_s, gen.unet_calls = [], 0.0, 0
    for r in range(plan["repeats"]):
        reqs = _requests(plan["prompts"][r * b:(r + 1) * b] or plan["prompts"][:b], list(range(b)), plan)
        t = time.perf_counter()
        gen.generate(reqs)
        per_image.append((time.perf_counter() - t) / b)
    return latency_stats(per_image, 1000 * gen.unet_time_s / max(1, gen.unet_calls))


def time_only(var_dir: Path, name: str, plan: dict, device: str, batch: int) -> dict:
    from export.variants import get

    torch.manual_seed(0)
    gen = get(name).load(var_dir, device)
    gen.generate(_requests(plan["prompts"][:batch], list(range(batch)), plan))  # warm-up
    return {"latency": {str(batch): time_batch(gen, plan, batch)}}


def run(var_dir: Path, name: str, plan: dict, device: str) -> tuple[dict, np.ndarray]:
    from export.variants import get

    # the libraries every variant uses (diffusers imports its models and schedulers lazily, ~160 MB):
    # imported before the baseline, so what follows is the variant's own memory
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    torch.manual_seed(0)
    rss = RssSampler()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    gen = get(name).load(var_dir, device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in plan["batch_sizes"]:  # first call per shape: allocations, compilation, ORT graph setup
        gen.generate(_requests(plan["prompts"][:b], list(range(b)), plan))
    warmup_s = time.perf_counter() - t0
    latency = {str(b): time_batch(gen, plan, b) for b in plan["batch_sizes"]}
    images = []
    qp, qs = plan["quality_prompts"], plan["quality_seeds"]
    for i in range(0, len(qp), plan["quality_batch"]):
        out = gen.generate(_requests(qp[i:i + plan["quality_batch"]], qs[i:i + plan["quality_batch"]], plan))
        images += [imgs[0] for imgs in out]
    peak, own = rss.stop()
    if device == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    result = {"load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3), "latency": latency,
              "peak_rss_mb": round(peak, 1), "variant_rss_mb": round(own, 1), "info": {k: v for k, v in gen.info.items() if k != "bench"}}
    if device == "cuda":
        result["peak_gpu_mb"] = round(peak_gpu, 1)
    return result, np.stack(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("var_dir")
    ap.add_argument("name")
    ap.add_argument("plan")
    ap.add_argument("out")
    ap.add_argument("images", nargs="?")
    ap.add_argument("--timing-only", type=int, metavar="BATCH")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    if args.timing_only:
        Path(args.out).write_text(json.dumps(time_only(Path(args.var_dir), args.name, plan, args.device,
                                                       args.timing_only), indent=2))
        return
    result, images = run(Path(args.var_dir), args.name, plan, args.device)
    np.save(args.images, images)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
