"""Pipeline reruns keyed by config (no training here: the decisions alone), and corrupt state files."""
import json

import pytest

from core.config import load_config
from core.errors import UserError
from pipeline.config import PipelineConfig
from pipeline.run import Pipeline


def _pipeline(tmp_path, *overrides):
    return Pipeline(load_config(PipelineConfig, None, list(overrides)), tmp_path / "run")


def test_a_changed_stage_config_or_input_is_made_again_and_says_why(tmp_path):
    p = _pipeline(tmp_path)
    p.out.mkdir()
    for stage in ("train", "eval", "export", "bento"):
        p._record(stage, status="done", output_id=f"{stage}-1")
    assert all(p.why_redo(s) is None for s in ("train", "eval", "export", "bento"))
    q = _pipeline(tmp_path, "training.train.learning_rate=0.5", "export.steps=7")
    assert q.why_redo("train") == "its config changed: training.train.learning_rate: 0.0001 -> 0.5"
    assert "export.steps: 20 -> 7" in q.why_redo("export")
    assert q.why_redo("bento") is None  # its own input (export) has not been made again yet
    q._record("export", status="done", output_id="export-2")  # export made again ...
    assert q.why_redo("bento") == "export, which it reads, was made again"  # ... so the Bento follows
    q.state["stages"]["train"]["output_id"] = "train-2"
    assert q.why_redo("eval") == "train, which it reads, was made again"
    newer = _pipeline(tmp_path)  # a setting added to the code since (null by default) is named, not hidden
    del newer.state["stages"]["train"]["config"]["training"]["train"]["cache_batch_size"]
    newer.state["stages"]["train"]["config_hash"] = "made-by-older-code"
    assert newer.why_redo("train") == "its config changed: training.train.cache_batch_size: (absent) -> null"
    legacy = _pipeline(tmp_path)
    legacy.state["stages"]["export"] = {"seconds": 1.0}  # written before configs were recorded
    assert "no record" in legacy.why_redo("export")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"stages": [1]}',
                                     b'{"stages": {"train": 3}}'])
def test_a_corrupt_state_file_is_one_line(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pipeline.json").write_bytes(content)
    with pytest.raises(UserError) as err:
        _pipeline(tmp_path)
    assert "pipeline.json" in str(err.value) and "\n" not in str(err.value) and "delete it" in str(err.value)


def test_corrupt_run_records_are_one_line(tmp_path):
    from pipeline.run import summary

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "train_report.json").write_text("{truncated")
    with pytest.raises(UserError, match="train report .* is corrupt"):
        summary(run)
    (run / "train" / "train_report.json").write_text(json.dumps({"what": "unet"}) + "x")
    with pytest.raises(UserError, match="corrupt"):
        summary(run)


def test_the_export_gate_measures_a_fine_tune_of_the_users_images_on_those_images(tmp_path):
    """Training data of the user's own (no synthetic: section) become the export's references and
    quality prompts; a synthetic world keeps its renders; a references setting of the user's wins."""
    own = _pipeline(tmp_path, "training.data.path=/data/mine", "training.data.caption_column=caption")
    refs = own.export_config().references
    assert (refs.path, refs.caption_column) == ("/data/mine", "caption")
    assert _pipeline(tmp_path, "training.data.synthetic={n: 10}").export_config().references is None
    from synthetic.dataset import generate_dataset

    rendered = generate_dataset(tmp_path / "shapes", n=4, seed=0, size=32)  # a folder t2i rendered
    assert _pipeline(tmp_path, f"training.data.path={rendered}").export_config().references is None
    chosen = _pipeline(tmp_path, "training.data.path=/data/mine", "export.references=/data/held-out")
    assert chosen.export_config().references.path == "/data/held-out"
