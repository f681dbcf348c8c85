"""What the serving benchmarks share: a real `t2i serve` on a free port of 127.0.0.1, started in its
own session and stopped with its whole process group; percentiles; PNG checks; JSON written atomically."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export_dir: str, log: Path, *args: str, env: dict | None = None,
                 ready_s: float = 600) -> tuple[subprocess.Popen, str]:
    """``t2i serve EXPORT_DIR ARGS...`` with a private BENTOML_HOME; returns once /readyz is 200."""
    import httpx

    port = free_port()
    full_env = {**os.environ, "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-"),
                "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", export_dir, "--host", "127.0.0.1",
                             "--port", str(port), *args], cwd=ROOT, env=full_env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < ready_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"server not ready in {ready_s:g} s")


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), rounded to ms; None for no data."""
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 3) if xs else None


def valid_png(data: bytes) -> bool:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.format == "PNG"
    except Exception:  # noqa: BLE001 - anything unreadable is invalid
        return False


def write_result(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
