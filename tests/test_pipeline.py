"""`t2i pipeline` end to end on the micro model: every stage's artifact, skipping on a re-run,
--force, resuming after a kill mid-training, the report rendered in headless Chromium, the Bento."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from export.manifest import read_manifest
from tests.conftest import ROOT, micro_overrides, run_cli

pytestmark = pytest.mark.slow  # runs the CLI / a server / training in subprocesses


def _config(tmp: Path, model: Path, data: Path, steps: int, bento: bool = True) -> Path:
    cfg = {"export": {"variants": ["eager-fp32", "eager-bf16"], "num_images": 8, "batch_sizes": [1], "repeats": 1,
                      "steps": 2, "max_fid_drift": 1000.0, "max_adherence_drop": 100.0},
           "training": {"eval": {"num_images": 8, "new_concepts": ["star"], "steps": 2, "batch_size": 8}},
           "bento": bento}
    path = tmp / f"pipeline-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _overrides(model, data, steps):
    return ["training." + o for o in micro_overrides(model, data, Path("unused"), steps) if not o.startswith("output_dir=")]


@pytest.fixture(scope="module")
def first_run(micro_model, micro_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    env = {"BENTOML_HOME": str(tmp / "bentoml")}
    cfg = _config(tmp, micro_model, micro_data, 4)
    res = run_cli("pipeline", str(cfg), "--out", str(tmp / "run"), *_overrides(micro_model, micro_data, 4), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, cfg, env, res


def test_all_stage_artifacts_and_summary(first_run):
    tmp, _, _, res = first_run
    run = tmp / "run"
    assert (run / "train" / "model" / "model_index.json").is_file()
    assert json.loads((run / "train" / "train_report.json").read_text())["steps"] == 4
    cmp = json.loads((run / "eval" / "compare.json").read_text())
    assert set(cmp["summary"]) == {"known", "new"}
    manifest = read_manifest(run / "export")
    assert manifest.selected in ("eager-fp32", "eager-bf16")
    tag = json.loads((run / "bento.json").read_text())["tag"]
    name, version = tag.split(":")
    assert (tmp / "bentoml" / "bentos" / name / version / "src" / "artifact" / "export.json").is_file()
    for f in ("report.html", "report.md", "report/loss.png", "report/before_after.png", "report/bench.png"):
        assert (run / f).is_file(), f
    out = res.stdout
    assert "selected:" in out and f"t2i serve {run / 'export'}" in out and f"bentoml serve {tag}" in out
    assert "| eager-fp32" in out  # the bench table is in the summary


def test_rerun_skips_completed_stages_and_force_redoes(first_run, micro_model, micro_data):
    tmp, cfg, env, _ = first_run
    run = tmp / "run"
    before = (run / "export" / "export.json").stat().st_mtime_ns
    res = run_cli("pipeline", str(cfg), "--out", str(run), *_overrides(micro_model, micro_data, 4), "--force", "bento",
                  env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("train", "eval", "export"):
        assert f"{stage}: already complete" in res.stdout, stage
    assert "bento: already complete" not in res.stdout and "[4/5] bento: done" in res.stdout
    assert (run / "export" / "export.json").stat().st_mtime_ns == before
    bad = run_cli("pipeline", str(cfg), "--out", str(run), "--force", "deploy", env=env)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr and "Traceback" not in bad.stderr


def test_rerun_with_a_changed_config_makes_that_stage_again_and_says_why(first_run, micro_model, micro_data):
    tmp, cfg, env, _ = first_run
    run = tmp / "run"
    res = run_cli("pipeline", str(cfg), "--out", str(run), *_overrides(micro_model, micro_data, 4), "export.steps=3",
                  env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[1/5] train: already complete" in res.stdout and "[2/5] eval: already complete" in res.stdout
    assert "[3/5] export: making it again: its config changed: export.steps: 2 -> 3" in res.stdout
    assert "[4/5] bento: making it again: export, which it reads, was made again" in res.stdout
    assert read_manifest(run / "export").plan.steps == 3
    # the variants' builds read no sampling setting: their folders are kept and benchmarked afresh
    assert all(e.reused for e in read_manifest(run / "export").measured().values())
    assert "eager-fp32: kept from the export of" in res.stdout
    (run / "pipeline.json").write_text('{"stages": ')
    bad = run_cli("pipeline", str(cfg), "--out", str(run), env=env)
    assert bad.returncode == 2 and "pipeline.json is corrupt" in bad.stderr and "Traceback" not in bad.stderr


def test_report_renders_in_headless_chromium(first_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (bash scripts/setup.sh test installs it)")
    report = first_run[0] / "run" / "report.html"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    n = dom.count("<img")
    assert n >= 3 and f'data-images-loaded="{n}/{n}"' in dom, dom[:500]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 10  # not a blank page: tables, plots and sample grids drew


def test_killed_training_resumes_and_finishes(micro_model, micro_data, tmp_path):
    cfg = _config(tmp_path, micro_model, micro_data, 30, bento=False)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "pipeline", str(cfg), "--out", str(run),
            *_overrides(micro_model, micro_data, 30), "training.checkpoint.every=4", "export.variants=[eager-fp32]"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list((run / "train" / "checkpoints").glob("checkpoint-*[0-9]/train_state.json")):  # complete (not .tmp)
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before a checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a polite stop
    proc.wait()
    assert not (run / "train" / "train_report.json").exists()
    res = run_cli("pipeline", str(cfg), "--out", str(run), *_overrides(micro_model, micro_data, 30),
                  "training.checkpoint.every=4", "export.variants=[eager-fp32]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    assert json.loads((run / "train" / "train_report.json").read_text())["steps"] == 30
    assert (run / "export" / "export.json").is_file() and (run / "report.html").is_file()
