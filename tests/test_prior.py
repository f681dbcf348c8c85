"""DreamBooth's prior preservation: class images drawn by the model, reused, and weighed in every batch."""
import json

import numpy as np
import pytest
import torch

from core.config import load_config
from core.errors import UserError
from tests.conftest import micro_overrides
from training.config import TrainConfig
from training.train import main, setup

PRIOR = ["prior.class_prompt=a circle", "prior.num_images=8", "prior.steps=2", "train.batch_size=4",
         "logging.final_samples=false", "checkpoint.save_final=false"]


def _cfg(micro_model, micro_data, out, extra=()):
    return load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, out, steps=2) + PRIOR + list(extra))


def test_class_images_are_drawn_once_trained_beside_the_users_and_reused(micro_model, micro_data, tmp_path, capsys):
    classes = tmp_path / "classes"
    cfg = _cfg(micro_model, micro_data, tmp_path / "a", [f"prior.dir={classes}"])
    report = main(cfg)
    assert "drawing 8 images of 'a circle'" in capsys.readouterr().out
    pngs = sorted(classes.glob("*.png"))
    assert len(pngs) == 8
    rows = [json.loads(line) for line in (classes / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a circle"] * 8
    assert report["class_images"] == 8 and report["num_images"] == 48  # the user's images counted apart

    # every batch: the user's images first, then as many class images, each class image once per its epoch
    run = setup(_cfg(micro_model, micro_data, tmp_path / "b", [f"prior.dir={classes}"]))
    assert "reusing 8 class images" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(classes.glob("*.png"))] == [p.stat().st_mtime_ns for p in pngs]
    first, second = run.batch_indices(0), run.batch_indices(1)
    for idx in (first, second):
        assert (idx[:4] < 48).all() and (idx[4:] >= 48).all() and len(idx) == 8
    assert sorted(np.concatenate([first[4:], second[4:]]).tolist()) == list(range(48, 56))
    assert run.data.captions[first[-1]] == "a circle"
    latents, emb = run.batch(first)  # the cache holds the class images' latents like the user's
    assert latents.shape[0] == 8 and torch.isfinite(latents).all()

    # another prompt is drawn again; the folder is replaced whole
    setup(_cfg(micro_model, micro_data, tmp_path / "c", [f"prior.dir={classes}", "prior.class_prompt=a square"]))
    assert "drawing 8 images of 'a square'" in capsys.readouterr().out
    assert json.loads((classes / "prior.json").read_text())["prompt"] == "a square"


def test_the_class_images_weigh_prior_weight_in_the_loss(micro_model, micro_data, tmp_path):
    run = setup(_cfg(micro_model, micro_data, tmp_path / "run"))
    latents, emb = run.batch(run.batch_indices(0))

    def loss(prior):
        torch.manual_seed(0)  # the same noise and timesteps each time
        with torch.no_grad():
            return run.model.loss(latents, emb, prior).item()

    users, w1, w3, plain = loss((4, 0.0)), loss((4, 1.0)), loss((4, 3.0)), loss(None)
    classes = w1 - users
    assert classes > 0 and w3 == pytest.approx(users + 3 * classes, rel=1e-5)
    assert plain == pytest.approx((users + classes) / 2, rel=1e-5)  # equal halves: the plain mean


def test_too_few_class_images_for_a_batch_is_refused_before_drawing(micro_model, micro_data, tmp_path):
    with pytest.raises(UserError, match="prior.num_images"):
        setup(_cfg(micro_model, micro_data, tmp_path / "run", ["prior.num_images=2"]))
    assert not (tmp_path / "run" / "class_images").exists()


def test_a_folder_t2i_did_not_draw_is_never_replaced(micro_model, micro_data, tmp_path):
    mine = tmp_path / "my-cats"
    mine.mkdir()
    (mine / "cat.png").write_bytes(b"my photo")
    with pytest.raises(UserError, match="did not draw"):
        setup(_cfg(micro_model, micro_data, tmp_path / "run", [f"prior.dir={mine}"]))
    assert (mine / "cat.png").read_bytes() == b"my photo"
    with pytest.raises(UserError, match="training data"):
        setup(_cfg(micro_model, micro_data, tmp_path / "run", [f"prior.dir={micro_data}"]))


def test_class_images_are_drawn_by_the_model_as_loaded(micro_model, micro_data, tmp_path):
    """A fine-tune that switches the model to v-prediction with zero terminal SNR still draws its class
    images with the model's own epsilon schedule (read as v they would be noise)."""
    from core.sampling import GenerationRequest, load_generator

    classes = tmp_path / "classes"
    setup(_cfg(micro_model, micro_data, tmp_path / "run", [f"prior.dir={classes}", "train.prediction_type=v_prediction",
                                                           "train.zero_terminal_snr=true"]))
    from PIL import Image

    drawn = np.asarray(Image.open(classes / "class-00003.png"))
    gen = load_generator(str(micro_model), scheduler="dpm")
    want = gen.generate([GenerationRequest("a circle", num_inference_steps=2, guidance_scale=5.0, seed=3)])[0][0]
    assert np.abs(drawn.astype(int) - want.astype(int)).max() <= 1


def test_prior_preservation_needs_a_unet_stage():
    with pytest.raises(ValueError, match="prior.class_prompt"):
        TrainConfig.model_validate({"train": {"what": "vae"}, "prior": {"class_prompt": "a cat"}})


def test_a_list_of_class_prompts_is_drawn_in_turn(micro_model, micro_data, tmp_path, capsys):
    """Class image i comes from prompt i mod the list's length (its caption says which); the folder is
    reused for the same list and drawn again for another; an empty or blank prompt is refused."""
    classes = tmp_path / "classes"
    cfg = _cfg(micro_model, micro_data, tmp_path / "a", [f"prior.dir={classes}",
                                                          "prior.class_prompt=[a red circle, a blue circle, a circle]"])
    setup(cfg)
    assert "drawing 8 images of 3 class prompts" in capsys.readouterr().out
    rows = [json.loads(line) for line in (classes / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a red circle", "a blue circle", "a circle"] * 2 + ["a red circle",
                                                                                              "a blue circle"]
    from PIL import Image

    from core.sampling import GenerationRequest, load_generator
    gen = load_generator(str(micro_model), scheduler="dpm")
    want = gen.generate([GenerationRequest("a blue circle", num_inference_steps=2, guidance_scale=5.0, seed=4)])[0][0]
    drawn = np.asarray(Image.open(classes / "class-00004.png"))
    assert np.abs(drawn.astype(int) - want.astype(int)).max() <= 1
    setup(cfg)
    assert "reusing 8 class images" in capsys.readouterr().out
    setup(_cfg(micro_model, micro_data, tmp_path / "b", [f"prior.dir={classes}",
                                                          "prior.class_prompt=[a red circle, a blue circle]"]))
    assert "drawing 8 images of 2 class prompts" in capsys.readouterr().out
    for bad, why in (("[]", "empty list"), ("[a circle, ' ']", "blank"), ("[1, 2]", "list of prompts"),
                     ("[" + ", ".join(f"a circle {i}" for i in range(9)) + "]", "never be drawn")):
        with pytest.raises(UserError, match=why):
            _cfg(micro_model, micro_data, tmp_path / "c", [f"prior.class_prompt={bad}"])
