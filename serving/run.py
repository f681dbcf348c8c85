"""``t2i serve``: runs ``bentoml serve`` on an export dir, passing SIGTERM / SIGINT on to it."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.config import ServeConfig, ServingConfig, to_env

SHUTDOWN_GRACE_S = 10.0


def _is_public(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host not in ("localhost",)


def serve(cfg: ServeConfig) -> int:
    """Starts the server and waits for it; a signal to this process stops the server and its workers."""
    from export.manifest import read_manifest

    # a wrong path or variant is a clear error here, not a crash in a worker
    read_manifest(cfg.export_dir).variant(cfg.variant, cfg.export_dir)
    service_cfg = ServingConfig.model_validate(cfg.model_dump(exclude={"host", "port"}))
    env = {**os.environ, **to_env(service_cfg)}
    if _is_public(cfg.host) and not env.get("T2I_API_KEY"):
        print(f"warning: binding {cfg.host} with no API key: anyone who can reach this machine can generate; "
              "set T2I_API_KEY or bind 127.0.0.1", file=sys.stderr)
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:ImageAPI", "--host", cfg.host,
           "--port", str(cfg.port), "--working-dir", str(Path(__file__).resolve().parents[1])]
    print(f"serving {cfg.export_dir} on http://{cfg.host}:{cfg.port} (POST /generate, "
          f"POST /v1/images/generations, GET /info); Ctrl-C stops", flush=True)
    # its own process group, so one signal reaches the server and every worker it started
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop_requested: list[float] = []

    def forward(signum, _frame):
        stop_requested.append(time.monotonic())
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                # in-flight requests get SHUTDOWN_GRACE_S to finish; then every process of the server goes
                if stop_requested and time.monotonic() - stop_requested[0] > SHUTDOWN_GRACE_S:
                    print(f"server still running {SHUTDOWN_GRACE_S:g} s after the stop signal; killing it",
                          file=sys.stderr)
                    os.killpg(proc.pid, signal.SIGKILL)
                    return proc.wait()
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
