"""Every shipped YAML parses into its typed config (torchtune's test_configs idea)."""
from pathlib import Path

import pytest
import yaml

from training.config import load_config
from training.errors import UserError
from pipeline.run import PipelineConfig
from training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    raw = yaml.safe_load(path.read_text())
    if "train" in raw or "model" in raw:  # training configs; `export:` / `bento:` make them pipeline configs
        cfg = load_config(PipelineConfig if {"export", "bento"} & set(raw) else TrainConfig, path)
        assert cfg.train.max_steps >= 1


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
