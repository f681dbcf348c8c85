"""Shared fixtures: a micro model dir and a micro dataset, built once per session (seconds on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    # the workers share the cores, and so do the torch processes they start (the env var reaches those)
    os.environ["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _longest_first(items) -> None:
    """The suite runs on two pytest-xdist workers, a file on one worker (addopts: ``-n 2 --dist loadfile
    --no-loadscope-reorder``), so a module fixture is built once (a session fixture once per worker).
    test_export.py goes first: its every-variant export makes it the longest file (about a third of the
    suite's work), and started last it would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.module.__name__ != "tests.test_export")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Eval caches (FID reference statistics, base images) go to a fresh folder, not the user's ~/.cache."""
    os.environ["T2I_CACHE"] = str(tmp_path_factory.mktemp("t2i-cache"))


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    from training.presets import build_preset

    return build_preset("micro", tmp_path_factory.mktemp("models") / "micro")


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    from synthetic.dataset import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "shapes", n=48, seed=3, size=32)


def forbid_unpickling(monkeypatch) -> None:
    """Makes every way of unpickling fail loudly (torch.load, pickle.load/loads, pickle.Unpickler), so a
    code path that passes under it reads no pickle."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Refuse:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refuse)


def evil_pickle(marker: Path) -> bytes:
    """A pickle that, when loaded, creates ``marker`` (what a hostile artifact would do, harmlessly)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")

    return pickle.dumps(Evil())


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Runs ``t2i`` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


API_KEY = "test-key-0123456789"  # the shared test server's key


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `t2i serve` on 127.0.0.1; ``probes``: (seconds since start, /readyz status or error)."""

    url: str
    proc: subprocess.Popen
    log: Path
    key: str | None
    probes: list[tuple[float, object]]
    mode: str = "step"  # T2I_BATCHING

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path: str, **kw):
        import httpx

        headers = {**self.auth, **kw.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, body, timeout: float = 120, **kw):
        import httpx

        headers = {**self.auth, **kw.pop("headers", {})}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout, **kw)


def start_server(export_dir: Path, log: Path, *args: str, key: str | None = None, ready_s: float = 300) -> Server:
    """Starts `t2i serve` in its own session and waits for /readyz 200, probing every 0.25 s with a 2 s
    client timeout and recording every answer."""
    import httpx

    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(log.parent / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("T2I_API_KEY", None)
    if key:
        env["T2I_API_KEY"] = key
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(export_dir), "--host", "127.0.0.1",
                                 "--port", str(port), *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, key, [])
    t0 = time.monotonic()
    while time.monotonic() - t0 < ready_s:
        if proc.poll() is not None:
            pytest.fail("server exited:\n" + log.read_text()[-3000:])
        try:
            code = httpx.get(f"{server.url}/readyz", timeout=2).status_code
        except httpx.TimeoutException:
            code = "timeout"
        except httpx.HTTPError:
            code = "no connection"
        server.probes.append((round(time.monotonic() - t0, 2), code))
        if code == 200:
            return server
        time.sleep(0.25)
    stop_server(server)
    pytest.fail(f"server not ready in {ready_s:g} s:\n" + log.read_text()[-3000:])


def stop_server(server: Server, timeout: float = 60) -> int:
    import signal

    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return server.proc.wait(timeout=timeout)


@pytest.fixture(scope="session")
def served_export(micro_model, tmp_path_factory) -> Path:
    """A micro model's eager-fp32 export, for the server tests."""
    out = tmp_path_factory.mktemp("serve") / "exp"
    res = run_cli("export", str(micro_model), "--out", str(out), "--variants", "eager-fp32", "--num-images", "4",
                  "--repeats", "1", "--batch-sizes", "1", "--steps", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


SERVER_ARGS = ("--max-batch-size", "8", "--max-latency-ms", "60000", "--max-concurrency", "8", "--body-timeout-s", "2")


@pytest.fixture(scope="session")
def server(served_export, tmp_path_factory):
    """One `t2i serve` for the server tests, in the default batching mode (step): API key on, limits
    small (8 images in flight counting two per guided image, 8 UNet rows per call, 2 s to send a body)."""
    srv = start_server(served_export, tmp_path_factory.mktemp("serve-log") / "serve.log", *SERVER_ARGS, key=API_KEY)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session", params=["step", "request", "off"])
def mode_server(request, server, served_export, tmp_path_factory):
    """The same server in each batching mode (T2I_BATCHING), for the tests every mode must pass."""
    if request.param == "step":
        server.mode = "step"
        yield server
        return
    srv = start_server(served_export, tmp_path_factory.mktemp(f"serve-{request.param}") / "serve.log", *SERVER_ARGS,
                       "--batching", request.param, key=API_KEY)
    srv.mode = request.param
    try:
        yield srv
    finally:
        stop_server(srv)


def micro_overrides(model: Path, data: Path, out: Path, steps: int = 4) -> list[str]:
    return [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", f"train.max_steps={steps}",
            "train.batch_size=8", "train.warmup_steps=0", "logging.sample_every=0", "logging.sample_steps=2",
            "logging.validation_prompts=[a red circle]", "logging.log_every=1", "checkpoint.every=2", "train.learning_rate=1e-3"]


@pytest.fixture(scope="session")
def micro_finetune(micro_model, micro_data, tmp_path_factory) -> Path:
    """A two-step fine-tune that also trains the text encoder and saves fp16 weights: the model dir that
    other tools must load with default arguments (it used to load in mixed dtypes, with renamed keys)."""
    from core.config import load_config
    from training.config import TrainConfig
    from training.train import main

    out = tmp_path_factory.mktemp("finetune") / "run"
    main(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, out, steps=2) + [
        "train.train_text_encoder=true", "train.save_dtype=fp16", "logging.final_samples=false"]))
    return out / "model"
