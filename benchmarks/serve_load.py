"""Load benchmark of the real service: `t2i serve` started twice (adaptive batching on, then off),
a concurrency sweep against POST /generate, and the in-process loader as the reference.

For each setting and concurrency: throughput (images/s of 200s), latency p50/p95/p99, responses by
status (only 200, 429 and 503 are acceptable), whether every 200 is a valid PNG, and the batch-size
histogram the model service recorded (BentoML's `adaptive_batch_size` in /metrics). Ratios are
measured in one run (the machine is shared and noisy).

    .venv/bin/python benchmarks/serve_load.py EXPORT_DIR --out benchmarks/results/serve_load.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def valid_png(data: bytes) -> bool:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.format == "PNG"
    except Exception:
        return False


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative bucket counts of bentoml_service_adaptive_batch_size, as /metrics gives them."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def per_bucket(before: dict, after: dict) -> dict[str, int]:
    """Batches run in this sweep step, per batch-size bucket (non-cumulative)."""
    keys = sorted((k for k in after if k != "+Inf"), key=float)
    cum = [after[k] - before.get(k, 0.0) for k in keys]
    return {f"<={k.rstrip('0').rstrip('.')}": int(c - (cum[i - 1] if i else 0)) for i, (k, c) in enumerate(zip(keys, cum))
            if c - (cum[i - 1] if i else 0) > 0}


def start(export_dir: str, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", export_dir, "--host", "127.0.0.1",
                             "--port", str(port), "--max-batch-size", str(max_batch), "--max-concurrency", "256"],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("server not ready in 600 s")


def sweep(url: str, concurrency: int, n: int, steps: int) -> dict:
    import httpx

    def one(i: int):
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{url}/generate", json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i,
                                                     "num_inference_steps": steps}, timeout=600)
            return r.status_code, time.perf_counter() - t0, r.content if r.status_code == 200 else b""
        except httpx.HTTPError as e:
            return f"error:{type(e).__name__}", time.perf_counter() - t0, b""

    hist0 = batch_histogram(url)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    ok = [lat for code, lat, _ in res if code == 200]
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 2),
            "throughput_img_s": round(len(ok) / wall, 2),
            "latency_s": {f"p{q}": round(pct(ok, q), 3) for q in (50, 95, 99)} if ok else None,
            "status": {str(k): v for k, v in Counter(code for code, _, _ in res).items()},
            "all_200_valid_png": all(valid_png(body) for code, _, body in res if code == 200),
            "batch_sizes": per_bucket(hist0, batch_histogram(url))}


def in_process(export_dir: str, n: int, steps: int) -> dict:
    from core.sampling import GenerationRequest
    from export.loader import load

    gen = load(export_dir)
    for i in range(3):
        gen.generate([GenerationRequest(PROMPTS[0], seed=i, num_inference_steps=steps)])
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        gen.generate([GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=i, num_inference_steps=steps)])
        lat.append(time.perf_counter() - t0)
    return {"variant": gen.info["variant"], "p50_s": round(statistics.median(lat), 4), "n": n}


PROMPTS = ["a red circle on the left", "a blue square in the top right", "a small green cross at the bottom",
           "a large yellow triangle in the centre on a black background", "an orange circle at the bottom right"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests per concurrent client (min 16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch-size", type=int, default=16, help="UNet rows per batch: 8 guided images")
    a = p.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    result = {"export_dir": a.export_dir, "steps": a.steps, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    result["in_process"] = in_process(a.export_dir, 16, a.steps)
    print("in-process p50", result["in_process"]["p50_s"], "s", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    for name, mb in (("batching_on", a.max_batch_size), ("batching_off", 1)):
        proc, url = start(a.export_dir, mb, logs / f"{name}.log")
        try:
            sweep(url, 2, 4, a.steps)  # warm the HTTP path
            rows = []
            for c in levels:
                rows.append(sweep(url, c, max(16, c * a.requests_per_client), a.steps))
                print(name, json.dumps(rows[-1]), flush=True)
            result[name] = {"max_batch_size": mb, "sweep": rows}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    on = {r["concurrency"]: r for r in result["batching_on"]["sweep"]}
    off = {r["concurrency"]: r for r in result["batching_off"]["sweep"]}
    result["summary"] = {
        "throughput_ratio_on_vs_off": {c: round(on[c]["throughput_img_s"] / max(off[c]["throughput_img_s"], 1e-9), 2)
                                       for c in on if c in off},
        "http_overhead_at_c1_pct": round(100 * (on[1]["latency_s"]["p50"] / result["in_process"]["p50_s"] - 1), 1)
        if 1 in on and on[1]["latency_s"] else None,
        "non_200_other_than_429_503": sum(v for r in [*on.values(), *off.values()] for k, v in r["status"].items()
                                          if k not in ("200", "429", "503")),
        "all_200_valid_png": all(r["all_200_valid_png"] for r in [*on.values(), *off.values()]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(a.out)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
