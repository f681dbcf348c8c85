"""Evaluation: FID behaviour, the domain classifier, the stats cache and the compare report."""
import random

import numpy as np
import pytest
import torch

from evaluation.classifier import load_classifier
from evaluation.evaluate import EvalConfig, adherence, compare, prompt_set, reference_images
from evaluation.fid import fid, load_reference, make_metric
from synthetic.world import WorldSpec, caption_scene, render_scene, sample_scene
from core.errors import UserError


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _world_images(n, seed):
    rng = random.Random(seed)
    scenes = [sample_scene(rng, WorldSpec()) for _ in range(n)]
    imgs = np.stack([np.asarray(render_scene(s, 64, random.Random(rng.random()))) for s in scenes])
    return imgs, scenes, [caption_scene(s, rng) for s in scenes]


def test_fid_self_is_zero_and_grows_with_noise(classifier):
    a, _, _ = _world_images(300, 1)
    b, _, _ = _world_images(300, 2)
    assert fid(a, a, "domain", classifier, cache=False) == pytest.approx(0.0, abs=1e-2)
    rng = np.random.default_rng(0)
    scores = []
    for sigma in (0, 20, 60):
        noisy = np.clip(b.astype(np.float32) + rng.normal(0, sigma, b.shape), 0, 255).astype(np.uint8)
        scores.append(fid(noisy, a, "domain", classifier, cache=False))
    assert scores[0] < scores[1] < scores[2]


def test_domain_classifier_reads_generator_images(classifier):
    imgs, scenes, captions = _world_images(400, 99)
    pred = classifier.predict(__import__("torch").from_numpy(imgs))
    for head in ("shape", "colour", "position"):
        acc = np.mean([p == s["objects"][0][head] for p, s in zip(pred[head], scenes)])
        assert acc >= 0.97, (head, acc)
    # adherence of real images to their own captions is near-perfect
    adh = adherence(imgs, captions, classifier)
    assert adh["shape+colour"] >= 97 and adh["all"] >= 95


def test_inception_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("T2I_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="T2I_INCEPTION_WEIGHTS"):
        make_metric("inception")
    from evaluation.fid import resolve_features

    assert resolve_features("auto") == "domain"  # never silently "inception" without weights


def test_reference_stats_cache_is_keyed_by_content(classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    ref, _, _ = _world_images(50, 5)
    first = load_reference(make_metric("domain", classifier), ref, "domain")
    again = load_reference(make_metric("domain", classifier), ref, "domain")
    assert not first["cached"] and again["cached"] and first["key"] == again["key"]
    changed = ref.copy()
    changed[0, 0, 0] ^= 1  # one pixel of one image
    third = load_reference(make_metric("domain", classifier), changed, "domain")
    assert not third["cached"] and third["key"] != first["key"]


def test_prompt_set_is_fixed_and_split():
    cfg = EvalConfig(num_images=20, new_concepts=["star", "purple"])
    a, b = prompt_set(cfg), prompt_set(cfg)
    assert [x["prompt"] for x in a] == [x["prompt"] for x in b]
    for it in a:
        has_new = any(w in it["prompt"] for w in ("star", "purple"))
        assert (it["split"] == "new") == has_new, it["prompt"]
    assert reference_images(a, 0).shape == (20, 64, 64, 3)


def test_reference_blocks_render_each_prompt_again_with_fresh_jitter(classifier):
    items = prompt_set(EvalConfig(num_images=12, new_concepts=["star"]))
    one, three = reference_images(items, 0), reference_images(items, 0, per_prompt=3)
    assert three.shape == (36, 64, 64, 3)
    assert np.array_equal(three[:12], one)  # the first block is the one-per-prompt set
    assert not np.array_equal(three[12:24], one)  # later blocks: same scenes, other jitter
    pred = classifier.predict(torch.from_numpy(three))
    for b in range(3):  # every block shows each prompt's own shape
        assert list(pred["shape"][b * 12:(b + 1) * 12]) == [it["scene"]["objects"][0]["shape"] for it in items]


def test_split_fid_uses_each_split_s_own_reference_images_from_every_block(classifier):
    from evaluation.evaluate import score_images

    cfg = EvalConfig(num_images=24, new_concepts=["star"], reference_per_prompt=2)
    items = prompt_set(cfg)
    items.insert(3, {"prompt": "a photo of a cat", "scene": None, "split": "known"})  # outside the grammar: no scene
    ref = reference_images(items, cfg.seed, per_prompt=2)
    scene_items = [it for it in items if it["scene"] is not None]
    assert len(ref) == 2 * len(scene_items)
    images = np.concatenate([ref[:3], np.zeros((1, 64, 64, 3), np.uint8), ref[3:len(scene_items)]])
    report = score_images(images, items, cfg, classifier)
    assert report["reference_images"] == len(ref)
    for split in ("known", "new"):
        idx = [i for i, it in enumerate(items) if it["split"] == split]
        own = [j for j, it in enumerate(scene_items) if it["split"] == split]
        want = fid(images[idx], ref[own + [len(scene_items) + j for j in own]], "domain", classifier, cache=False)
        assert report["splits"][split]["fid"] == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
def test_compare_separates_known_and_new(micro_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = EvalConfig(num_images=8, new_concepts=["star"], steps=2, batch_size=8)
    report = compare(str(micro_model), str(micro_model), str(tmp_path / "cmp"), cfg)
    assert set(report["summary"]) == {"known", "new"}
    for split in ("known", "new"):
        row = report["summary"][split]
        # same model on both sides: identical images, identical scores
        assert row["adherence_before"] == row["adherence_after"]
        assert row["fid_before"] == pytest.approx(row["fid_after"])
    assert (tmp_path / "cmp" / "compare.json").exists() and (tmp_path / "cmp" / "before_after.png").exists()
    # a different "after" model (its UNet's output bias shifted) changes the after side only
    other = tmp_path / "other"
    shutil.copytree(micro_model, other)
    path = other / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["conv_out.bias"] = weights["conv_out.bias"] + 0.5
    save_file(weights, path)
    moved = compare(str(other), str(micro_model), str(tmp_path / "cmp2"), cfg)
    for split in ("known", "new"):
        assert moved["summary"][split]["fid_before"] == pytest.approx(report["summary"][split]["fid_before"])
        assert moved["summary"][split]["fid_after"] != pytest.approx(report["summary"][split]["fid_after"])


@pytest.mark.slow
def test_a_model_of_real_images_is_evaluated_against_its_own_data(micro_model, tmp_path):
    """references: a dataset's captions are the prompts and its images the FID references (the
    synthetic world's renders say nothing about photos); a bad dataset fails before any generation."""
    import json

    from PIL import Image

    from evaluation.evaluate import evaluate

    def dataset(name: str, pixels) -> list[str]:
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"file_name": f"p{i}.jpg", "text": f"a photo of my dog, take {i}"} for i in range(10)]
        for i, row in enumerate(rows):
            Image.fromarray(pixels(i)).save(folder / row["file_name"])
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return [r["text"] for r in rows]

    rng = np.random.default_rng(1)
    captions = dataset("noise", lambda i: rng.integers(0, 256, (40, 24 + 4 * i, 3), dtype=np.uint8))
    dataset("grey", lambda i: np.full((40, 40, 3), 60 + 10 * i, np.uint8))
    cfg = EvalConfig(num_images=6, steps=2, batch_size=8, references=str(tmp_path / "noise"), features="domain")
    assert {it["prompt"] for it in prompt_set(cfg, captions)} <= set(captions)
    report = evaluate(str(micro_model), str(tmp_path / "ev"), cfg)
    assert report["reference_images"] == 10 and report["fid"] > 0 and report["splits"]["all"]["fid"] > 0
    assert report["adherence"]["shape+colour"] is None  # no prompt of the synthetic world
    grey = evaluate(str(micro_model), str(tmp_path / "ev2"),
                    cfg.model_copy(update={"references": EvalConfig(references=str(tmp_path / "grey")).references}))
    assert grey["fid"] != pytest.approx(report["fid"])
    with pytest.raises(UserError, match="does not exist"):
        evaluate(str(micro_model), str(tmp_path / "ev3"), EvalConfig(references=str(tmp_path / "missing")))
    assert not (tmp_path / "ev3").exists()


@pytest.mark.slow
def test_compare_reuses_base_images_until_the_base_changes(micro_model, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(micro_model, base)
    cfg = EvalConfig(num_images=4, new_concepts=["star"], steps=2, batch_size=4)
    first = compare(str(micro_model), str(base), str(tmp_path / "a"), cfg)
    again = compare(str(micro_model), str(base), str(tmp_path / "b"), cfg)
    assert not first["base_images_cached"] and again["base_images_cached"]
    assert again["summary"] == first["summary"]
    assert len(list((tmp_path / "cache" / "eval-images").glob("*.npy"))) == 1
    (base / "model_index.json").write_text((base / "model_index.json").read_text() + "\n")  # any edit of the base
    changed = compare(str(micro_model), str(base), str(tmp_path / "c"), cfg)
    assert not changed["base_images_cached"] and len(list((tmp_path / "cache" / "eval-images").glob("*.npy"))) == 2
    other = compare(str(micro_model), str(base), str(tmp_path / "d"), cfg.model_copy(update={"steps": 3}))
    assert not other["base_images_cached"]
