"""Shared fixtures: a micro model dir and a micro dataset, built once per session (seconds on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def micro_overrides(model: Path, data: Path, out: Path, steps: int = 4) -> list[str]:
    return [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}", f"train.max_steps={steps}",
            "train.batch_size=8", "train.warmup_steps=0", "logging.sample_every=0", "logging.sample_steps=2",
            "logging.validation_prompts=[a red circle]", "logging.log_every=1", "checkpoint.every=2", "train.learning_rate=1e-3"]
