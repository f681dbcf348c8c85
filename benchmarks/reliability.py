"""Reliability benchmark: what an attacker, a careless client and a crash do to the product.

1. fuzz: `t2i serve EXPORT_DIR` (API key on, --max-concurrency 8 --max-batch-size 8) gets ``--fuzz-cases``
   property-based requests (benchmarks/fuzz_api.py): counts by status, 5xx, invalid 200s.
2. soak: 2x its capacity of concurrent clients (capacity: max_concurrency / UNet rows per request) post
   for ``--soak-s`` seconds (600 by default): statuses (only 200/429/503 allowed), invalid PNGs, latency,
   images/s, and the server's memory (RSS of all its processes) after warm-up and at the end.
3. abandoned: 8 clients post a long request and leave; how long a real client then waits.
4. crash: `t2i train` (micro preset, EMA, a checkpoint every 3 steps) is killed with SIGKILL at 10
   random points (random steps plus a random fraction of a checkpoint interval: mid-step or
   mid-write) and resumed each time; before the last resume its newest checkpoint is truncated.
   The final weights are compared bit for bit with an uninterrupted run.

    python benchmarks/reliability.py EXPORT_DIR [--soak-s 600] [--out benchmarks/results/reliability.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fuzz_api import fuzz  # noqa: E402
from benchmarks.server import pct, start_server, stop_server, valid_png, write_result  # noqa: E402

KEY = "bench-key"
MAX_CONCURRENCY = 8


def start(export_dir: str, log: Path) -> tuple[subprocess.Popen, str]:
    return start_server(export_dir, log, "--max-batch-size", "8", "--max-concurrency", str(MAX_CONCURRENCY),
                        env={"T2I_API_KEY": KEY}, ready_s=600)


def server_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def soak(url: str, pid: int, seconds: float, steps: int) -> dict:
    """2x capacity of clients for ``seconds``; a client that gets 429 waits its Retry-After (1 s)."""
    import httpx

    rows = 2  # one guided image per request
    clients = 2 * (MAX_CONCURRENCY // rows)
    stop = time.monotonic() + seconds
    warm_s = min(60.0, seconds / 5)  # memory is compared from here on
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    invalid = [0]
    lock = threading.Lock()
    rss: list[tuple[float, float]] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as c:
            n = 0
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    r = c.post(url + "/generate", json={"prompt": "a red circle on the left", "seed": i * 100000 + n,
                                                        "num_inference_steps": steps})
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code, r = f"error:{type(e).__name__}", None
                with lock:
                    codes[code] += 1
                    if code == "200":
                        latencies.append(time.monotonic() - t0)
                        invalid[0] += not valid_png(r.content)
                n += 1
                if code != "200":
                    time.sleep(1.0)

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(clients) as ex:
        futures = [ex.submit(client, i) for i in range(clients)]
        while not all(f.done() for f in futures):
            rss.append((round(time.monotonic() - t0, 1), server_rss_mb(pid)))
            time.sleep(5)
        for f in futures:
            f.result()
    wall = time.monotonic() - t0
    after_warm = [m for t, m in rss if t >= warm_s] or [rss[-1][1]]
    return {"seconds": round(wall, 1), "clients": clients, "capacity_requests": MAX_CONCURRENCY // rows,
            "steps": steps, "status": dict(sorted(codes.items())),
            "only_200_429_503": set(codes) <= {"200", "429", "503"}, "invalid_png": invalid[0],
            "images_per_s": round(codes["200"] / wall, 2), "latency_p50_s": pct(latencies, 50),
            "latency_p95_s": pct(latencies, 95), "rss_mb_after_warmup": after_warm[0], "rss_mb_end": rss[-1][1],
            "rss_mb_max": max(m for _, m in rss),
            "rss_growth_after_warmup_pct": round(100 * (rss[-1][1] / after_warm[0] - 1), 1)}


def abandoned(url: str, steps: int) -> dict:
    """One long request's time, then 8 clients post long requests and leave after 2 s; the real
    client's wait afterwards."""
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": "a red circle", "num_inference_steps": steps}
    t0 = time.monotonic()
    httpx.post(url + "/generate", json=long, headers=auth, timeout=600)
    one = time.monotonic() - t0
    body = json.dumps(long).encode()
    req = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port))) for _ in range(8)]
    for s in socks:
        s.sendall(req)
    time.sleep(2.0)
    for s in socks:
        s.close()
    time.sleep(0.2)
    t0 = time.monotonic()
    r = httpx.post(url + "/generate", json={"prompt": "a blue square", "num_inference_steps": 20}, headers=auth,
                   timeout=600)
    return {"abandoned": 8, "long_request_steps": steps, "one_long_request_s": round(one, 2),
            "real_client_status": r.status_code, "real_client_wait_s": round(time.monotonic() - t0, 2)}


def _train_cmd(model: Path, data: Path, out: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "configs/base/vae.yaml", "data.synthetic=null",
            "train.what=unet", f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}",
            f"train.max_steps={steps}", "train.batch_size=8", "train.warmup_steps=0", "train.learning_rate=1e-3",
            "train.ema_decay=0.99", "train.ema_warmup=false", "logging.sample_every=0", "logging.final_samples=false",
            "logging.log_every=1", f"checkpoint.every={every}", "checkpoint.resume_from=latest"]


def _newest_step(ckpt_dir: Path) -> int:
    steps = [int(p.name.split("-")[1].split(".")[0]) for p in ckpt_dir.glob("checkpoint-*")]
    return max(steps, default=0)


def crash(kills: int, steps: int, every: int, seed: int) -> dict:
    """Uninterrupted run vs the same run SIGKILLed at ``kills`` random points and resumed each time."""
    from safetensors.torch import load_file

    from synthetic.dataset import generate_dataset
    from training.presets import build_preset

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="t2i-crash-"))
    model = build_preset("micro", work / "micro")
    data = generate_dataset(work / "data", n=48, seed=3, size=32)
    t0 = time.monotonic()
    res = subprocess.run(_train_cmd(model, data, work / "straight", steps, every), cwd=ROOT, capture_output=True,
                         text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    straight_s = time.monotonic() - t0
    step_s = json.loads((work / "straight" / "train_report.json").read_text())["wall_time_s"] / steps
    targets = sorted(rng.sample(range(every, steps - 2 * every), kills))  # room to be killed before the end
    out, points = work / "crashed", []
    for target in targets:
        start = _newest_step(out / "checkpoints")
        proc = subprocess.Popen(_train_cmd(model, data, out, steps, every), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        # this attempt trains at least one interval (no kill during start-up) and reaches the target's interval
        while _newest_step(out / "checkpoints") < max(start + every, (target // every) * every) and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, every * step_s))  # somewhere in the next interval: a step or a write
        writing = any(p.name.endswith(".tmp") for p in (out / "checkpoints").glob("checkpoint-*"))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        points.append({"target_step": target, "newest_checkpoint_seen": _newest_step(out / "checkpoints"),
                       "checkpoint_being_written": writing, "finished_before_kill": proc.returncode == 0})
    done = sorted(p for p in (out / "checkpoints").glob("checkpoint-*[0-9]") if (p / "train_state.json").exists())
    truncated = None
    if len(done) >= 2:  # a crash mid-write on a filesystem that reorders: the newest one is corrupt
        f = done[-1] / "model_0.safetensors"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        truncated = done[-1].name
    res = subprocess.run(_train_cmd(model, data, out, steps, every), cwd=ROOT, capture_output=True, text=True,
                         timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(work / "straight" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    return {"steps": steps, "checkpoint_every": every, "ema": True, "uninterrupted_s": round(straight_s, 1),
            "kills": sum(not p["finished_before_kill"] for p in points), "points": points,
            "killed_mid_checkpoint_write": sum(p["checkpoint_being_written"] for p in points),
            "truncated_before_last_resume": truncated,
            "fell_back_past_it": truncated is not None and f"skipping {truncated}" in res.stdout + res.stderr,
            "final_weights_bit_identical": identical}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir")
    p.add_argument("--out", default="benchmarks/results/reliability.json")
    p.add_argument("--fuzz-cases", type=int, default=500)
    p.add_argument("--soak-s", type=float, default=600, help="soak duration (600 by default; 60-120 for a short run)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the soak's requests")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: fuzz,soak,abandoned,crash")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    result = {"export_dir": a.export_dir, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "max_concurrency": MAX_CONCURRENCY, "max_batch_size": 8}
    if not {"fuzz", "soak", "abandoned"} <= skip:
        log = Path(tempfile.mkdtemp(prefix="t2i-reliability-")) / "serve.log"
        proc, url = start(a.export_dir, log)
        try:
            if "fuzz" not in skip:
                result["fuzz"] = fuzz(url, KEY, a.fuzz_cases, a.seed)
                print("fuzz", json.dumps({k: v for k, v in result["fuzz"].items() if k != "failures"}), flush=True)
            if "soak" not in skip:
                result["soak"] = soak(url, proc.pid, a.soak_s, a.steps)
                print("soak", json.dumps(result["soak"]), flush=True)
            if "abandoned" not in skip:
                result["abandoned"] = abandoned(url, 100)
                print("abandoned", json.dumps(result["abandoned"]), flush=True)
            result["server_log_tracebacks"] = log.read_text().count("Traceback")
        finally:
            stop_server(proc)
    if "crash" not in skip:
        result["crash"] = crash(a.kills, a.train_steps, 3, a.seed)
        print("crash", json.dumps({k: v for k, v in result["crash"].items() if k != "points"}), flush=True)
    write_result(result, a.out)


if __name__ == "__main__":
    main()
