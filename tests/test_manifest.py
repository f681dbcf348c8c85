"""The typed export manifest: round trip, files written before it was typed, bad files as one clear
line, variant folders that escape the export dir, and the documented schema."""
import json
import subprocess
import sys

import pytest

from core.errors import UserError
from export.manifest import ExportManifest, read_manifest, schema_markdown, write_manifest
from tests.conftest import ROOT, run_cli


def _old_manifest() -> dict:
    """export.json exactly as export wrote it before the manifest was typed (no plan, no schema_version)."""
    bench = {"load_s": 0.5, "warmup_s": 1.2, "peak_rss_mb": 900.0, "info": {"variant": "eager-fp32"},
             "latency": {"1": {"median_s": 0.1, "p95_s": 0.12, "unet_step_ms": 4.0},
                         "4": {"median_s": 0.05, "p95_s": 0.06, "unet_step_ms": 9.0}},
             "unet_gflops_per_s": 12.5, "unet_fraction_of_fp32_peak": 0.1}
    quality = {"features": "domain", "fid": 10.0, "fid_drift": 0.0, "fid_drift_pct": 0.0, "fid_vs_baseline": 0.0,
               "psnr_db_median": 100.0, "ssim": 1.0, "mean_abs_px_diff": 0.0, "adherence": 90.0,
               "adherence_drop": 0.0, "within_tolerance": True}
    return {
        "model_dir": "/runs/demo/train/model", "device": "cpu", "created": "2026-11-30 10:00:00",
        "config": {"model": "/runs/demo/train/model", "out": "/runs/demo/export", "variants": ["eager-fp32"],
                   "max_fid_drift": 5.0, "max_adherence_drop": 2.0, "num_images": 100, "batch_sizes": [1, 4],
                   "repeats": 5, "steps": 20, "guidance": 5.0, "features": "auto", "select": None,
                   "device": None, "seed": 0},
        "budget": {"max_fid_drift_pct": 5.0, "max_adherence_drop_pts": 2.0}, "baseline": "eager-fp32",
        "hardware": {"cpu": "x86_64", "threads": 2, "matmul_fp32_gflops": 100.0, "unet_gflop_per_step_b1": 0.5},
        "variants": {
            "eager-fp32": {"status": "ok", "dir": "eager-fp32", "build_s": 1.0, "size_mb": 10.0, "tolerance_px": 0.5,
                           "notes": {"format": "diffusers", "dtype": "fp32"},
                           "load": {"registry": "eager-fp32", "call": "export.loader.load(EXPORT_DIR, 'eager-fp32')"},
                           "bench": bench, "quality": quality, "within_budget": True},
            "eager-fp16": {"status": "skipped", "reason": "needs a CUDA GPU"},
            "onnx-int8": {"status": "failed", "reason": "RuntimeError: boom"},
        },
        "selected": "eager-fp32", "selection_reason": "fastest at batch 1",
    }


def _write(tmp_path, data) -> None:
    (tmp_path / "export.json").write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_files_written_before_the_typed_manifest_still_load(tmp_path):
    _write(tmp_path, _old_manifest())
    m = read_manifest(tmp_path)
    assert m.schema_version == 1 and m.selected == "eager-fp32" and m.bundled_from is None
    assert m.plan.batch_sizes == [1, 4] and m.plan.steps == 20 and m.plan.smallest_batch == 1  # from config
    e = m.variants["eager-fp32"]
    assert e.bench.latency[4].median_s == 0.05 and e.quality.fid == 10.0 and e.load.registry == "eager-fp32"
    assert list(m.ok_variants()) == ["eager-fp32"] and list(m.measured()) == ["eager-fp32"]
    assert m.variants["eager-fp16"].status == "skipped" and m.variants["eager-fp16"].dir is None


def test_round_trip_keeps_the_keys_on_disk(tmp_path):
    _write(tmp_path, _old_manifest())
    m = read_manifest(tmp_path)
    out = tmp_path / "again"
    out.mkdir()
    write_manifest(out / "export.json", m)
    assert read_manifest(out) == m
    on_disk = json.loads((out / "export.json").read_text())
    old = _old_manifest()
    assert set(old) <= set(on_disk) and set(on_disk) - set(old) == {"schema_version", "plan", "bundled_from"}
    # a variant's fields that do not apply stay absent, as before
    assert on_disk["variants"]["eager-fp16"] == old["variants"]["eager-fp16"]
    assert on_disk["variants"]["eager-fp32"] == old["variants"]["eager-fp32"]
    assert not [p for p in out.iterdir() if p.name != "export.json"]  # the atomic write left no temp file


def _error(tmp_path) -> str:
    with pytest.raises(UserError) as e:
        read_manifest(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _with(**changes) -> dict:
    m = _old_manifest()
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = m
        for k in path:
            node = node[k]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return m


@pytest.mark.parametrize("content,expected", [
    (None, "no export.json"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a valid export manifest"),
    (_with(selection_reason=...) | {"surprise": 1}, "unknown key 'surprise'"),
    (_with(model_dir=...), "'model_dir' is missing"),
    (_with(variants__onnx_int8={"status": "maybe"}), "variants.onnx_int8.status"),
    (_with(variants__eager_fp16={"status": "skipped"}), "needs a reason"),
    (_with(selected="onnx-int8"), "not a built (ok) variant"),
    (_with(schema_version=99), "newer than this t2i reads"),
    (_with(**{"variants__eager-fp32__dir": "/etc"}), "inside the export dir"),
    (_with(**{"variants__eager-fp32__dir": "../../elsewhere"}), "inside the export dir"),
    (_with(**{"variants__eager-fp32__dir": "a/../../b"}), "inside the export dir"),
])
def test_bad_manifest_is_one_clear_line(tmp_path, content, expected):
    if isinstance(content, bytes):
        (tmp_path / "export.json").write_bytes(content)
    elif content is not None:
        _write(tmp_path, content)
    msg = _error(tmp_path)
    assert expected in msg, msg


def test_variant_choice(tmp_path):
    _write(tmp_path, _old_manifest())
    m = read_manifest(tmp_path)
    assert m.variant(None, tmp_path)[0] == "eager-fp32"
    for name, why in (("onnx-int8", "boom"), ("turbo", "not in the manifest")):
        with pytest.raises(UserError, match=why):
            m.variant(name, tmp_path)
    with pytest.raises(UserError, match="selects no variant"):
        m.model_copy(update={"selected": None}).variant(None, tmp_path)


def test_cli_reports_an_escaping_variant_dir_without_traceback(tmp_path):
    _write(tmp_path, _with(**{"variants__eager-fp32__dir": "../../etc"}))
    res = run_cli("bento", str(tmp_path), env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert res.returncode == 2 and "inside the export dir" in res.stderr and "Traceback" not in res.stderr


def test_manifest_module_stays_light():
    code = "import sys, export.manifest; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_docs_hold_the_schema():
    doc = (ROOT / "docs" / "export-json.md").read_text()
    assert schema_markdown() in doc, "docs/export-json.md is stale: paste export.manifest.schema_markdown() in"
    for name in ExportManifest.model_fields:
        assert f"`{name}`" in doc
