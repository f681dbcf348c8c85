"""The CLI as a user runs it: help text, data and generate."""
import json

from PIL import Image

from tests.conftest import run_cli


def test_help_documents_every_config_key():
    res = run_cli("train", "--help")
    assert res.returncode == 0
    for key in ("train.learning_rate", "train.what", "checkpoint.resume_from", "lora.rank", "data.on_bad_image"):
        assert key in res.stdout
    assert "Peak learning rate" in res.stdout  # field docstrings become help


def test_data_command_writes_imagefolder(tmp_path):
    res = run_cli("data", "shapes", "--out", str(tmp_path / "d"), "--n", "5", "--size", "32", "--exclude", "star")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["objects"][0]["shape"] != "star" for r in rows)
    res = run_cli("data", "shapes", "--out", str(tmp_path / "d"), "--n", "5")
    assert res.returncode == 2 and "already exists" in res.stderr


def test_generate_writes_pngs(micro_model, tmp_path):
    res = run_cli("generate", str(micro_model), "a red circle on the left", "--out", str(tmp_path / "x.png"),
                  "--steps", "2", "--num-images", "2", "--scheduler", "ddim")
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "x.png").size == (64, 32)  # the grid of two
    assert Image.open(tmp_path / "x-1.png").size == (32, 32)
