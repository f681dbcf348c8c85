import json
import random

import pytest

from synthetic.dataset import generate_dataset
from synthetic.world import ATTRIBUTES, WorldSpec, caption_scene, parse_caption, sample_scene
from core.datasets import load_imagefolder
from core.errors import UserError


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_dataset(tmp_path):
    a = generate_dataset(tmp_path / "a", n=12, seed=7, size=32)
    b = generate_dataset(tmp_path / "b", n=12, seed=7, size=32)
    c = generate_dataset(tmp_path / "c", n=12, seed=8, size=32)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)


def test_imagefolder_layout_and_attributes(micro_data):
    rows = [json.loads(line) for line in (micro_data / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 48
    for row in rows:
        assert (micro_data / row["file_name"]).is_file()
        assert row["text"] and row["background"] in ATTRIBUTES["background"]
        obj = row["objects"][0]
        assert obj["shape"] in ATTRIBUTES["shape"] and obj["colour"] in ATTRIBUTES["colour"]
    loaded = load_imagefolder(str(micro_data), 32)
    assert loaded.pixels.shape == (48, 32, 32, 3) and loaded.skipped == 0
    assert not list(micro_data.parent.glob("*.tmp"))


def test_exclude_and_focus(tmp_path):
    spec = WorldSpec(exclude=("star", "purple"))
    rng = random.Random(0)
    scenes = [sample_scene(rng, spec) for _ in range(500)]
    assert all(o["shape"] != "star" and o["colour"] != "purple" for s in scenes for o in s["objects"])
    focus = WorldSpec(focus=("heart",), focus_fraction=1.0)
    scenes = [sample_scene(rng, focus) for _ in range(100)]
    assert all(s["objects"][0]["shape"] == "heart" for s in scenes)
    with pytest.raises(UserError, match="unknown concept"):
        WorldSpec(exclude=("dodecahedron",))


def test_contrast_replays_the_nearest_known_concepts_more_often(tmp_path):
    from synthetic.dataset import synthetic_spec_matches

    def shares(spec, n=3000):
        rng = random.Random(3)
        objs = [sample_scene(rng, spec)["objects"][0] for _ in range(n)]
        return {v: sum(v in (o["shape"], o["colour"]) for o in objs) / n for v in ("pink", "cross", "red", "purple")}
    focus = dict(focus=("star", "purple"), focus_fraction=0.5)
    plain, contrast = shares(WorldSpec(**focus)), shares(WorldSpec(**focus, contrast=("pink", "cross"),
                                                                    contrast_fraction=0.3))
    # 15% forced each, plus the free draws: 1/9 of the colours of the star, uniform and cross images (25%,
    # 20%, 15%), 1/6 of the shapes of the purple, uniform and pink images; without contrast the uniform share is 50%
    assert contrast["pink"] == pytest.approx(0.15 + 0.60 / 9, abs=0.02)
    assert contrast["cross"] == pytest.approx(0.15 + 0.60 / 6, abs=0.025)
    assert plain["pink"] == pytest.approx(0.75 / 9, abs=0.015) and plain["cross"] == pytest.approx(0.75 / 6, abs=0.02)
    assert contrast["purple"] == pytest.approx(plain["purple"], abs=0.03)  # the focus share is untouched
    assert contrast["red"] < plain["red"]  # the contrast images come out of the uniform replay
    # a folder rendered without contrast still matches its settings (its record has no contrast keys) ...
    generate_dataset(tmp_path / "d", n=4, seed=1, size=32, spec=WorldSpec(**focus))
    assert synthetic_spec_matches(tmp_path / "d", 4, 1, 32, WorldSpec(**focus)) is True
    # ... and is rendered again when contrast is added
    assert synthetic_spec_matches(tmp_path / "d", 4, 1, 32, WorldSpec(**focus, contrast=("pink",),
                                                                       contrast_fraction=0.1)) is False
    with pytest.raises(UserError, match="also focused"):
        WorldSpec(**focus, contrast=("star",), contrast_fraction=0.1)
    with pytest.raises(UserError, match="contrast_fraction"):
        WorldSpec(**focus, contrast=("pink",), contrast_fraction=0.6)


@pytest.mark.parametrize("max_shapes", [1, 2])
def test_captions_round_trip_through_parser(max_shapes):
    rng = random.Random(1)
    spec = WorldSpec(max_shapes=max_shapes)
    for _ in range(300):
        scene = sample_scene(rng, spec)
        text = caption_scene(scene, rng)
        parsed = parse_caption(text)
        assert len(parsed["objects"]) == len(scene["objects"]), text
        for want, got in zip(scene["objects"], parsed["objects"]):
            for attr in ("shape", "colour", "position"):
                assert got[attr] == want[attr], (text, attr)
            assert got["size"] in (None, want["size"])
        assert parsed["background"] in (None, scene["background"])


def test_parse_free_form_prompt():
    p = parse_caption("A small blue square, top right, on a white background")
    assert p["background"] == "white"
    assert p["objects"] == [{"shape": "square", "colour": "blue", "size": "small", "position": "top right"}]


def test_stale_synthetic_dataset_is_rendered_again(tmp_path):
    from training.config import TrainConfig
    from training.run import prepare_data

    def cfg(focus_fraction):
        return TrainConfig.model_validate({"data": {"path": str(tmp_path / "d"), "synthetic": {
            "n": 20, "seed": 1, "size": 32, "focus": ["star"], "focus_fraction": focus_fraction}}})

    def star_share(loaded):
        return sum(o["shape"] == "star" for r in loaded.rows for o in r["objects"]) / len(loaded.rows)

    first = prepare_data(cfg(1.0), 32)
    assert star_share(first) == 1.0
    sentinel = tmp_path / "d" / ".kept"  # gone if the folder is rendered again
    sentinel.touch()
    assert prepare_data(cfg(1.0), 32).captions == first.captions and sentinel.exists()  # same settings: reused
    again = prepare_data(cfg(0.0), 32)  # changed settings: not the old images under the new recipe
    assert star_share(again) < 1.0 and not sentinel.exists()
    (tmp_path / "d" / ".t2i-synthetic.json").unlink()  # not rendered by t2i: left alone
    assert prepare_data(cfg(1.0), 32).captions == again.captions
