"""Every bad input: one clear line on stderr, exit code 2, no traceback, no half-written output."""
import json
import shutil

import pytest

from tests.conftest import micro_overrides, run_cli

pytestmark = pytest.mark.slow  # runs the CLI / a server / training in subprocesses


def _assert_clean_error(res, *needles):
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def _train(model, data, out, *extra):
    return run_cli("train", "configs/base/vae.yaml", *micro_overrides(model, data, out), "data.synthetic=null",
                   "train.what=unet", *extra)


def test_missing_dataset(micro_model, tmp_path):
    res = _train(micro_model, tmp_path / "nope", tmp_path / "out")
    _assert_clean_error(res, "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_dataset(micro_model, tmp_path):
    (tmp_path / "empty").mkdir()
    res = _train(micro_model, tmp_path / "empty", tmp_path / "out")
    _assert_clean_error(res, "empty")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def broken_data(micro_data, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(micro_data, d)
    (d / "000001.png").write_bytes(b"not a png at all")
    return d


def test_broken_image_is_skipped_and_counted(micro_model, broken_data, tmp_path):
    res = _train(micro_model, broken_data, tmp_path / "out", "train.max_steps=1")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["skipped_images"] == 1 and report["num_images"] == 47


def test_broken_image_error_option(micro_model, broken_data, tmp_path):
    res = _train(micro_model, broken_data, tmp_path / "out", "data.on_bad_image=error")
    _assert_clean_error(res, "000001.png", "cannot be decoded")
    assert not (tmp_path / "out").exists()


def test_row_without_caption(micro_model, micro_data, tmp_path):
    d = tmp_path / "nocap"
    shutil.copytree(micro_data, d)
    rows = (d / "metadata.jsonl").read_text().splitlines()
    row = json.loads(rows[3])
    row.pop("text")
    rows[3] = json.dumps(row)
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    res = _train(micro_model, d, tmp_path / "out")
    _assert_clean_error(res, "no caption", row["file_name"])


def test_unknown_config_key(micro_model, micro_data, tmp_path):
    res = _train(micro_model, micro_data, tmp_path / "out", "train.learnig_rate=1")
    _assert_clean_error(res, "train.learnig_rate", "train.learning_rate")
    assert not (tmp_path / "out").exists()


def test_unsupported_resolution(micro_model, micro_data, tmp_path):
    res = _train(micro_model, micro_data, tmp_path / "out", "model.resolution=36")  # divisible by the micro model's 4, not by 8
    _assert_clean_error(res, "resolution 36")


def test_missing_model_dir(micro_data, tmp_path):
    res = _train(tmp_path / "no-model", micro_data, tmp_path / "out")
    _assert_clean_error(res, "does not exist")
    res = run_cli("generate", str(tmp_path / "no-model"), "a red circle", "--out", str(tmp_path / "x.png"))
    _assert_clean_error(res, "does not exist")
    assert not (tmp_path / "x.png").exists()


def test_corrupt_checkpoint_on_resume(micro_model, micro_data, tmp_path):
    out = tmp_path / "out"
    assert _train(micro_model, micro_data, out, "train.max_steps=2").returncode == 0
    ckpt = out / "checkpoints" / "checkpoint-0000002"
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    before = (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    res = _train(micro_model, micro_data, out, "train.max_steps=4", "checkpoint.resume_from=latest")
    _assert_clean_error(res, "corrupt", "checkpoint-0000002")
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_bad_dataset_generation_args(tmp_path):
    res = run_cli("data", "shapes", "--out", str(tmp_path / "d"), "--n", "4", "--exclude", "unicorn")
    _assert_clean_error(res, "unicorn")
    assert not (tmp_path / "d").exists()


def test_generate_bad_args(micro_model, tmp_path):
    res = run_cli("generate", str(micro_model), "a red circle", "--steps", "0", "--out", str(tmp_path / "x.png"))
    _assert_clean_error(res, "--steps")
    res = run_cli("generate", str(micro_model), "a red circle", "--size", "36", "--out", str(tmp_path / "x.png"))
    _assert_clean_error(res, "--size 36")
