"""Every shipped YAML parses into its typed config (torchtune's test_configs idea)."""
from pathlib import Path

import pytest
import yaml

from core.config import load_config
from core.errors import UserError
from pipeline.config import PipelineConfig
from pipeline.config import TrainAndEval
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))  # configs/base/ included


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_parses(path):
    raw = yaml.safe_load(path.read_text())
    if "training" in raw:  # a pipeline config: the training section may name a training YAML
        cfg = load_config(PipelineConfig, path)
        assert cfg.training.train.max_steps >= 1 and cfg.export.variants
    elif "train" in raw or "model" in raw:  # `t2i train` configs: training plus an optional eval: section
        cfg = load_config(TrainAndEval, path)
        assert cfg.train.max_steps >= 1
    elif "anchor_weight" in raw:  # t2i train-autoencoder
        from training.config import AutoencoderConfig

        assert load_config(AutoencoderConfig, path).steps >= 1
    else:
        from evaluation.config import ClassifierConfig

        assert load_config(ClassifierConfig, path).epochs >= 1


def test_sd15_shape_preset_has_sd15_unet_size():
    import torch
    from diffusers import UNet2DConditionModel

    from training.presets import PRESETS, unet_kwargs

    with torch.device("meta"):  # shapes only: no 3.4 GB of random weights on a test machine
        unet = UNet2DConditionModel(**unet_kwargs(PRESETS["sd15-shape"]))
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 859.5) < 1  # SD 1.5's UNet


def test_bentofile_parses():
    from bentoml._internal.bento.build_config import BentoBuildConfig

    data = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    BentoBuildConfig.from_yaml((ROOT / "bentofile.yaml").open())
    assert "service" in data


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, None, ["train.learning_rat=1e-4"])
    msg = str(e.value)
    assert "train.learning_rat" in msg and "train.learning_rate" in msg and "train.max_steps" in msg


def test_overrides_are_typed():
    cfg = load_config(TrainConfig, None, ["train.max_steps=7", "logging.validation_prompts=[a,b]",
                                          "train.ema_decay=0.99"])
    assert cfg.train.max_steps == 7 and cfg.logging.validation_prompts == ["a", "b"]
    assert cfg.train.ema_decay == 0.99
    with pytest.raises(UserError, match="train.max_steps"):
        load_config(TrainConfig, None, ["train.max_steps=0"])


def test_yaml_no_means_the_string_no():
    cfg = load_config(TrainConfig, None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def test_a_path_shorthand_merges_with_an_override_of_its_other_fields(tmp_path):
    """`references: DIR` in a file is {path: DIR}: an override of one of its other keys keeps the path
    (merged as written, the override's {caption_column: c} replaced the string and the path was lost)."""
    f = tmp_path / "train.yaml"
    f.write_text("model: {pretrained: m}\ndata: {path: d}\neval: {references: data/mine}\n")
    cfg = load_config(TrainAndEval, f, ["eval.references.caption_column=caption"])
    assert (cfg.eval.references.path, cfg.eval.references.caption_column) == ("data/mine", "caption")
    cfg = load_config(TrainAndEval, f, ["eval.references=data/other"])  # the shorthand in an override
    assert (cfg.eval.references.path, cfg.eval.references.caption_column) == ("data/other", "text")
    f.write_text("model: {pretrained: m}\ndata: {path: d}\neval: {references: {path: a, caption_column: cap}}\n")
    cfg = load_config(TrainAndEval, f, ["eval.references=data/other"])  # another dataset: not a's columns
    assert (cfg.eval.references.path, cfg.eval.references.caption_column) == ("data/other", "text")
