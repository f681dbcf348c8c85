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


def run(var_dir: Path, name: str, plan: dict, device: str) -> tuple[dict, np.ndarray]:
    from export.variants import get

    torch.manual_seed(0)
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
            "unet_step_ms": round(1000 * gen.unet_time_s / max(1, gen.unet_calls), 3),
        }
    images = []
    qp, qs = plan["quality_prompts"], plan["quality_seeds"]
    for i in range(0, len(qp), plan["quality_batch"]):
        out = gen.generate(_requests(qp[i:i + plan["quality_batch"]], qs[i:i + plan["quality_batch"]], plan))
        images += [imgs[0] for imgs in out]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    result = {"load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3), "latency": latency,
              "peak_rss_mb": round(peak, 1), "info": {k: v for k, v in gen.info.items() if k != "bench"}}
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
