"""The CLI as a user runs it: help text, data and generate."""
import json

import pytest
from PIL import Image

from tests.conftest import run_cli


def test_help_lists_every_key_with_the_models_default():
    """Each command's --help is generated from its config model: every leaf key, its docstring and the
    model's own default (one source of defaults)."""
    import re

    from core.cli import field_default, leaf_fields
    from pipeline.cli import _commands

    for name, (cls, *_rest) in _commands().items():
        res = run_cli(*name.split(), "--help")
        assert res.returncode == 0, res.stderr
        text = " ".join(res.stdout.split()).split("config keys (each")[1]  # the options, not the usage line
        chunks = {c.split()[0].rstrip(","): c for c in re.split(r" (?=--(?!no-)[a-z])", text) if c.startswith("--")}
        for key, f in leaf_fields(cls):
            chunk = chunks.get("--" + key.replace("_", "-"))
            assert chunk, (name, key)
            default = field_default(f)
            if default == "required":
                assert chunk.endswith("(required)"), (name, key)
            else:
                shown = chunk[chunk.rindex("(default: ") + 10:-1]
                # help wraps lines (also inside words at hyphens): compare without whitespace
                assert shown.replace(" ", "") == repr(default).replace(" ", ""), (name, key, shown, default)
    res = run_cli("train", "--help")
    assert "Peak learning rate" in res.stdout  # field docstrings become help


def test_help_and_version_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, time; t = time.perf_counter(); from pipeline.cli import build_parser; build_parser(); "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"  # the parser is built from the config models alone
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("t2i-sprint ")


def test_every_command_takes_config_overrides_and_flags(tmp_path):
    from core.cli import config_from_args
    from pipeline.cli import parse_args

    cfg = config_from_args(parse_args(["export", "m", "--out", "o", "variants=[onnx-fp32]", "--batch-sizes", "1,2"]))
    assert (cfg.model, cfg.out, cfg.variants, cfg.batch_sizes) == ("m", "o", ["onnx-fp32"], [1, 2])
    yml = tmp_path / "t.yaml"
    yml.write_text("train: {max_steps: 5, learning_rate: 1.0e-3}\n")
    cfg = config_from_args(parse_args(["train", str(yml), "train.max_steps=7", "--train.learning-rate", "2e-3"]))
    assert (cfg.train.max_steps, cfg.train.learning_rate) == (7, 2e-3)  # YAML < key=value < flags
    cfg = config_from_args(parse_args(["train", "--prior.class-prompt", "[a red cat, a cat]"]))
    assert cfg.prior.class_prompt == ["a red cat", "a cat"]  # a str | list field reads [..] as a list
    for raw, want in (("a cat, sitting", "a cat, sitting"), ("[sks] dog", "[sks] dog"),
                      ("[a cat, 'a dog, sitting']", ["a cat", "a dog, sitting"])):
        assert config_from_args(parse_args(["train", "--prior.class-prompt", raw])).prior.class_prompt == want
    res = run_cli("export", "m", "--out", "o", "bogus_key=1")
    assert res.returncode == 2 and "bogus_key" in res.stderr and "max_fid_drift" in res.stderr
    assert "Traceback" not in res.stderr


def test_data_command_writes_imagefolder(tmp_path):
    res = run_cli("data", "shapes", "--out", str(tmp_path / "d"), "--n", "5", "--size", "32", "--exclude", "star")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["objects"][0]["shape"] != "star" for r in rows)
    res = run_cli("data", "shapes", "--out", str(tmp_path / "d"), "--n", "5")
    assert res.returncode == 2 and "already exists" in res.stderr


@pytest.mark.slow
def test_generate_writes_pngs(micro_model, tmp_path):
    res = run_cli("generate", str(micro_model), "a red circle on the left", "--out", str(tmp_path / "x.png"),
                  "--steps", "2", "--num-images", "2", "--scheduler", "ddim")
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "x.png").size == (64, 32)  # the grid of two
    assert Image.open(tmp_path / "x-1.png").size == (32, 32)
