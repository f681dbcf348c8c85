"""``t2i serve``: runs ``bentoml serve`` on an export dir, passing SIGTERM / SIGINT on to it.

Before the server starts, what can be checked without loading the model is checked and reported as
one line: the manifest and variant, the API key file, and whether the variant ships code (the
compile variant's Inductor cache, int8-static's package), which runs only when built here or with
--trusted-artifacts."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from serving.config import ServeConfig, ServingConfig, to_env

SHUTDOWN_GRACE_S = 10.0


def _is_public(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host not in ("localhost",)


def serve(cfg: ServeConfig) -> int:
    """Starts the server and waits for it; a signal to this process stops the server and its workers."""
    from export.loader import check

    # a wrong path, variant or key file, or untrusted shipped code, is a clear error here, not a crash in a worker
    name, code = check(cfg.export_dir, cfg.variant, cfg.trusted_artifacts)
    if code:
        print(f"variant {name} {code}", flush=True)
    service_cfg = ServingConfig.model_validate(cfg.model_dump(exclude={"host", "port"}))
    env = {**os.environ, **to_env(service_cfg)}
    key = service_cfg.api_key(env)  # an unreadable key file is an error here, not in a worker
    if key:
        print("an API key is set: generation and /info need 'Authorization: Bearer KEY'", flush=True)
    elif _is_public(cfg.host):
        print(f"warning: binding {cfg.host} with no API key: anyone who can reach this machine can generate; "
              "set T2I_API_KEY or bind 127.0.0.1", file=sys.stderr)
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:ImageAPI", "--host", cfg.host,
           "--port", str(cfg.port), "--working-dir", str(Path(__file__).resolve().parents[1])]
    print(f"serving {cfg.export_dir} on http://{cfg.host}:{cfg.port} (POST /generate, "
          f"POST /v1/images/generations, GET /info); Ctrl-C stops", flush=True)
    # its own process group: this process decides when it stops. BentoML stops its workers itself; any
    # still running SHUTDOWN_GRACE_S after the stop signal (or after the server exits) are killed here
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop_requested: list[float] = []

    def forward(signum, _frame):
        stop_requested.append(time.monotonic())
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    tree: dict[int, psutil.Process] = {}  # every process of the server seen so far
    try:
        while True:
            tree.update({p.pid: p for p in _descendants(proc.pid)})
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                # in-flight requests get SHUTDOWN_GRACE_S to finish; then every process of the server goes
                if stop_requested and time.monotonic() - stop_requested[0] > SHUTDOWN_GRACE_S:
                    print(f"server still running {SHUTDOWN_GRACE_S:g} s after the stop signal; killing it",
                          file=sys.stderr)
                    _kill(tree.values())
                    rc = proc.wait()
                    break
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
        # BentoML's workers run in sessions of their own: the server's exit does not end them, this does
        left = [p for p in tree.values() if p.is_running()]
        if left:
            waited = time.monotonic() - stop_requested[0] if stop_requested else SHUTDOWN_GRACE_S
            _, left = psutil.wait_procs(left, timeout=max(1.0, SHUTDOWN_GRACE_S - waited))
            _kill(left)
        return rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
