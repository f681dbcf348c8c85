"""``t2i serve``: runs ``bentoml serve`` on an export dir, passing SIGTERM / SIGINT on to it."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

from serving.config import ServeConfig, ServingConfig, to_env


def _is_public(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host not in ("localhost",)


def serve(cfg: ServeConfig) -> int:
    """Starts the server and waits for it; a signal to this process stops the server and its workers."""
    from export.loader import read_manifest

    read_manifest(cfg.export_dir)  # a wrong path is a clear error here, not a crash in a worker
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

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            forward(signal.SIGINT, None)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
