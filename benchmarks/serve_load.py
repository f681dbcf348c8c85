"""Load benchmark of the real service in its three batching modes (T2I_BATCHING=step|request|off).

One run measures, on the same export dir and the same request mix (steps 10-30, guidance 1 / 5 / 7.5,
some negative prompts, one image each, seeded):
1. the in-process ceiling: the step engine's images/s with every request queued at once, no HTTP;
   its capacity is the load unit below;
2. open loop, per mode: `t2i serve` started with that mode, Poisson arrivals at 25, 50, 80, 100 and
   120% of the capacity (bounded in count and time): throughput, goodput (images/s answered within the
   SLO), p50/p95/p99 latency and queue time (latency minus the request's compute time), statuses
   (only 200, 429, 503 are acceptable), every 200 a valid PNG, and for step mode the mean running-set
   size per UNet call (from /metrics);
3. closed loop, per mode: a concurrency sweep (1, 4, 16 clients, each posting as soon as answered).
Ratios are taken within the run (the machine is shared and noisy). Writes JSON and a PNG plot.

    .venv/bin/python benchmarks/serve_load.py EXPORT_DIR --out benchmarks/results/serve_load.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.server import pct, start_server, stop_server, valid_png, write_result  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square in the top right", "a small green cross at the bottom",
           "a large yellow triangle in the centre on a black background", "an orange circle at the bottom right"]
MODES = ("step", "request", "off")
LOADS = (0.25, 0.5, 0.8, 1.0, 1.2)


def mix(n: int, seed: int = 0) -> list[dict]:
    """The request mix: steps 10-30, guidance 1 / 5 / 7.5 (unguided = one UNet row), a third with a
    negative prompt; the same list for every mode."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(PROMPTS), "seed": i, "num_inference_steps": rng.choice([10, 15, 20, 25, 30]),
             "guidance_scale": rng.choice([1.0, 5.0, 7.5]),
             "negative_prompt": rng.choice(["", "", "a blue square"])} for i in range(n)]


def in_process(export_dir: str, reqs: list[dict], max_rows: int) -> dict:
    """The engine's best images/s on the mix (all queued at once), and each request's time alone."""
    from core.sampling import GenerationRequest
    from core.stepper import StepEngine
    from export.loader import load

    gen = load(export_dir)
    gen.generate([GenerationRequest(PROMPTS[0], num_inference_steps=2)])
    alone = {}
    for steps, g in ((30, 7.5), (20, 5.0), (10, 1.0)):
        t0 = time.perf_counter()
        gen.generate([GenerationRequest(PROMPTS[0], num_inference_steps=steps, guidance_scale=g)])
        alone[f"{steps}_steps_g{g:g}"] = round(time.perf_counter() - t0, 3)
    engine = StepEngine(gen, max_rows=max_rows, max_queue_rows=10**6)
    try:
        t0 = time.perf_counter()
        futures = [engine.submit(GenerationRequest(**r)) for r in reqs]
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    return {"variant": gen.info["variant"], "requests": len(reqs), "images_per_s": round(len(reqs) / wall, 3),
            "alone_s": alone, "mean_rows_per_unet_call": round(engine.stats["rows"] / engine.stats["steps"], 2)}


def engine_rows(url: str) -> tuple[float, float]:
    """(sum, count) of t2i_engine_step_rows in /metrics (0, 0 when the mode has no engine)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    get = lambda name: sum(float(m) for m in re.findall(rf"^{name} ([0-9.e+]+)$", text, re.M))  # noqa: E731
    return get("t2i_engine_step_rows_sum"), get("t2i_engine_step_rows_count")


def post(url: str, body: dict) -> tuple[object, float, float, bool]:
    """(status, latency s, compute s, valid PNG) of one POST /generate."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/generate", json=body, timeout=600)
    except httpx.HTTPError as e:
        return f"error:{type(e).__name__}", time.perf_counter() - t0, 0.0, False
    lat = time.perf_counter() - t0
    ok = r.status_code == 200
    return r.status_code, lat, float(r.headers.get("x-compute-ms", 0)) / 1000 if ok else 0.0, ok and valid_png(r.content)


def summarize(res: list, wall: float, slo_s: float) -> dict:
    ok = [(lat, comp) for code, lat, comp, _ in res if code == 200]
    lats = [lat for lat, _ in ok]
    return {"requests": len(res), "wall_s": round(wall, 2), "throughput_img_s": round(len(ok) / wall, 3),
            "goodput_img_s": round(sum(lat <= slo_s for lat in lats) / wall, 3),
            "latency_s": {f"p{q}": pct(lats, q) for q in (50, 95, 99)},
            "queue_s": {f"p{q}": pct([max(0.0, lat - comp) for lat, comp in ok], q) for q in (50, 95)},
            "status": {str(k): v for k, v in Counter(code for code, *_ in res).items()},
            "all_200_valid_png": all(valid for code, _, _, valid in res if code == 200)}


def open_loop(url: str, reqs: list[dict], rate: float, slo_s: float, seed: int) -> dict:
    """Poisson arrivals at ``rate`` requests/s; each request is posted at its arrival time whatever
    is still running (a thread each)."""
    rng = random.Random(seed)
    results: list = [None] * len(reqs)
    threads = []
    rows0 = engine_rows(url)
    t0 = time.perf_counter()
    at = 0.0
    for i, body in enumerate(reqs):
        at += rng.expovariate(rate)
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        th = threading.Thread(target=lambda i=i, body=body: results.__setitem__(i, post(url, body)), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    out = summarize(results, time.perf_counter() - t0, slo_s)
    rows1 = engine_rows(url)
    if rows1[1] > rows0[1]:
        out["mean_rows_per_unet_call"] = round((rows1[0] - rows0[0]) / (rows1[1] - rows0[1]), 2)
    return out


def closed_loop(url: str, reqs: list[dict], concurrency: int, slo_s: float) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(lambda body: post(url, body), reqs))
    return {"concurrency": concurrency, **summarize(res, time.perf_counter() - t0, slo_s)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rows = result["modes"][mode]["open_loop"]
        x = [r["load"] * 100 for r in rows]
        axes[0].plot(x, [r["latency_s"]["p95"] for r in rows], marker="o", label=mode)
        axes[1].plot(x, [r["goodput_img_s"] for r in rows], marker="o", label=mode)
    axes[0].set(xlabel="offered load (% of capacity)", ylabel="p95 latency (s)", yscale="log",
                title="p95 latency, Poisson arrivals")
    axes[1].set(xlabel="offered load (% of capacity)", ylabel="images/s within the SLO",
                title=f"goodput (SLO {result['slo_s']:.1f} s)")
    axes[1].axhline(result["in_process"]["images_per_s"], color="gray", ls="--", label="in-process ceiling")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['in_process']['variant']} on {result['cpus']} CPUs, mix of 10-30 steps, guidance 1-7.5")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir")
    p.add_argument("--out", default="benchmarks/results/serve_load.json", help="JSON; the plot goes next to it (.png)")
    p.add_argument("--requests", type=int, default=40, help="requests per open-loop load point")
    p.add_argument("--max-point-s", type=float, default=90, help="cap on one load point's arrival window (s)")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop sweep")
    p.add_argument("--max-batch-size", type=int, default=16, help="UNet rows per call, both batching modes")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--slo-factor", type=float, default=3.0,
                   help="latency SLO = this x the slowest request of the mix alone (30 steps, guided), in-process")
    a = p.parse_args()
    reqs = mix(max(a.requests, 16))
    result = {"export_dir": a.export_dir, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"), "max_batch_size": a.max_batch_size,
              "mix": "steps 10/15/20/25/30, guidance 1/5/7.5, 1/3 with a negative prompt, 1 image each"}
    result["in_process"] = ip = in_process(a.export_dir, reqs, a.max_batch_size)
    cap = ip["images_per_s"]
    result["slo_s"] = slo = round(a.slo_factor * ip["alone_s"]["30_steps_g7.5"], 3)
    print("in-process", json.dumps(ip), "SLO", slo, "s", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    result["modes"] = {}
    for mode in a.modes.split(","):
        proc, url = start_server(a.export_dir, logs / f"{mode}.log", "--batching", mode, "--max-batch-size",
                                 str(a.max_batch_size), "--max-concurrency", "256")
        try:
            closed_loop(url, reqs[:4], 2, slo)  # warm the HTTP path
            ol = []
            for i, load in enumerate(LOADS):
                rate = load * cap
                n = max(8, min(a.requests, int(rate * a.max_point_s)))
                ol.append({"load": load, "rate_req_s": round(rate, 3), **open_loop(url, reqs[:n], rate, slo, seed=i)})
                print(mode, "open", json.dumps(ol[-1]), flush=True)
            cl = []
            for c in (int(x) for x in a.concurrency.split(",")):
                cl.append(closed_loop(url, reqs[:max(8, 2 * c)], c, slo))
                print(mode, "closed", json.dumps(cl[-1]), flush=True)
            result["modes"][mode] = {"open_loop": ol, "closed_loop": cl}
        finally:
            stop_server(proc)
    result["summary"] = summary(result)
    write_result(result, a.out)
    if set(MODES) <= set(result["modes"]):
        plot(result, Path(a.out).with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))


def summary(result: dict) -> dict:
    m = result["modes"]
    out: dict = {}
    at = lambda mode, load: next(r for r in m[mode]["open_loop"] if r["load"] == load)  # noqa: E731
    saturated = lambda mode: max(r["throughput_img_s"] for r in m[mode]["open_loop"] + m[mode]["closed_loop"]  # noqa: E731
                                 if r.get("load", 1.0) >= 1.0)
    c1 = lambda mode: next(r for r in m[mode]["closed_loop"] if r["concurrency"] == 1)  # noqa: E731
    if {"step", "request"} <= set(m):
        out["p95_at_80pct_step_over_request"] = round(at("step", 0.8)["latency_s"]["p95"]
                                                      / at("request", 0.8)["latency_s"]["p95"], 3)
        out["saturation_throughput_step_over_request"] = round(saturated("step") / saturated("request"), 3)
    if {"step", "off"} <= set(m):
        out["p50_at_concurrency_1_step_over_off"] = round(c1("step")["latency_s"]["p50"] / c1("off")["latency_s"]["p50"], 3)
    if "step" in m:
        out["step_saturated_throughput_over_in_process_ceiling"] = round(
            saturated("step") / result["in_process"]["images_per_s"], 3)
    rows = [r for v in m.values() for r in v["open_loop"] + v["closed_loop"]]
    out["responses_other_than_200_429_503"] = sum(v for r in rows for k, v in r["status"].items()
                                                  if k not in ("200", "429", "503"))
    out["all_200_valid_png"] = all(r["all_200_valid_png"] for r in rows)
    return out


if __name__ == "__main__":
    main()
