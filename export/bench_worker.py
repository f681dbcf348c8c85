"""Benchmarks one variant in a fresh process (so load time, warm-up and peak memory are its own):

    python -m export.bench_worker VAR_DIR NAME PLAN.json OUT.json IMAGES.npy [--device cpu]

Writes timing JSON and the variant's images for the quality prompts (uint8 NHWC .npy).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.sampling import GenerationRequest  # noqa: E402


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
    latency = {}
    for b in plan["batch_sizes"]:
        per_image, gen.unet_time_s, gen.unet_calls = [], 0.0, 0
        for r in range(plan["repeats"]):
            reqs = _requests(plan["prompts"][r * b:(r + 1) * b] or plan["prompts"][:b], list(range(b)), plan)
            t = time.perf_counter()
            gen.generate(reqs)
            per_image.append((time.perf_counter() - t) / b)
        per_image.sort()
        latency[str(b)] = {
            "median_s": round(statistics.median(per_image), 4),
            "p95_s": round(per_image[min(len(per_image) - 1, int(round(0.95 * (len(per_image) - 1))))], 4),
            "min_s": round(per_image[0], 4),
            "unet_step_ms": round(1000 * gen.unet_time_s / max(1, gen.unet_calls), 3),
        }
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
    ap.add_argument("images")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    result, images = run(Path(args.var_dir), args.name, plan, args.device)
    np.save(args.images, images)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
