"""Datasets as users have them: any size, mode and orientation; captions in JSONL, CSV or side-car
files; a summary and a VAE fit check before training."""
import json

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from tests.conftest import ROOT, run_cli
from core.datasets import load_imagefolder

BASE = ROOT / "models" / "tiny-base"


def _write(folder, name, im):
    folder.mkdir(parents=True, exist_ok=True)
    im.save(folder / name)
    return name


def test_modes_orientation_and_aspect(tmp_path):
    d = tmp_path / "d"
    red = np.zeros((40, 80, 3), np.uint8)
    red[:, :40] = (255, 0, 0)  # left half red, right half black: the centre crop keeps both
    names = [
        _write(d, "wide.png", Image.fromarray(red)),
        _write(d, "gray.png", Image.fromarray(np.full((32, 32), 100, np.uint8), "L")),
        _write(d, "rgba.png", Image.fromarray(np.zeros((32, 32, 4), np.uint8), "RGBA")),  # transparent -> white
        _write(d, "p.png", Image.fromarray(np.full((32, 32, 3), (0, 0, 255), np.uint8)).convert("P")),
        _write(d, "deep.png", Image.fromarray(np.full((32, 32), 65535, np.uint16))),  # 16-bit white
    ]
    tall = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 32, 3)))  # 64h x 32w
    exif = tall.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown as 32h x 64w, dark on the right
    tall.save(d / "exif.jpg", exif=exif, quality=95)
    names.append("exif.jpg")
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"image {n}"}) + "\n" for n in names))
    data = load_imagefolder(str(d), 16)
    px = dict(zip([r["file_name"] for r in data.rows], data.pixels))
    assert data.pixels.shape == (6, 16, 16, 3) and data.skipped == 0
    assert (px["wide.png"][:, :7] == (255, 0, 0)).all() and (px["wide.png"][:, 9:] == 0).all()
    assert (px["gray.png"] == 100).all()  # grayscale stays gray: equal channels
    assert (px["rgba.png"] == 255).all()
    assert (px["p.png"] == (0, 0, 255)).all()
    assert (px["deep.png"] == 255).all()
    assert dict(zip([r["file_name"] for r in data.rows], data.sizes))["exif.jpg"] == (64, 32)
    row = px["exif.jpg"][8, :, 0].astype(int)
    assert row[0] > row[-1] + 100  # EXIF applied: the bright end is on the left


def test_captions_from_csv_and_side_car_files(tmp_path):
    img = Image.fromarray(np.full((20, 20, 3), 128, np.uint8))
    csv_dir, side = tmp_path / "csv", tmp_path / "side"
    _write(csv_dir, "a.png", img)
    _write(csv_dir, "b.png", img)
    (csv_dir / "metadata.csv").write_text('file_name,text\na.png,"a photo, of a cat"\nb.png,a dog\n')
    assert load_imagefolder(str(csv_dir), 16).captions == ["a photo, of a cat", "a dog"]
    _write(side, "x.png", img)
    _write(side / "sub", "y.jpg", img)
    (side / "x.txt").write_text("a red fox\n")
    (side / "sub" / "y.caption").write_text("a grey owl")
    assert sorted(load_imagefolder(str(side), 16).captions) == ["a grey owl", "a red fox"]
    (side / "x.txt").unlink()
    with pytest.raises(UserError, match="x.png has no caption"):
        load_imagefolder(str(side), 16)
    none = tmp_path / "none"
    _write(none, "z.png", img)
    with pytest.raises(UserError, match="no captions"):
        load_imagefolder(str(none), 16)


def _shades(folder, n=10):
    """A captioned folder of ``n`` flat images, image i of grey level 10 i (which row it was)."""
    names = [_write(folder, f"{i:02d}.png", Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)))
             for i in range(n)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    return folder


def test_references_decode_at_most_max_images_a_fixed_sample_of_the_rows(tmp_path):
    from core.config import ReferenceData
    from evaluation.evaluate import dataset_references

    d = _shades(tmp_path / "refs")
    shades = [int(p[0, 0, 0]) for p in dataset_references(ReferenceData(path=str(d), max_images=4), 16)]
    assert len(set(shades)) == 4 and shades == sorted(shades) and shades != [0, 10, 20, 30]  # a sample, not the head
    assert shades == [int(p[0, 0, 0]) for p in dataset_references(ReferenceData(path=str(d), max_images=4), 16)]
    assert len(dataset_references(ReferenceData(path=str(d), max_images=10), 16)) == 10  # at the cap: all of them
    with pytest.raises(ValueError, match="max_images"):
        ReferenceData(path=str(d), max_images=1)


@pytest.fixture
def hub():
    """The hub split is loaded once per process; these tests stand in a new one each time."""
    from core.datasets import _hub_split

    _hub_split.cache_clear()
    yield
    _hub_split.cache_clear()


def test_a_hub_dataset_is_capped_to_the_same_sample(tmp_path, monkeypatch, hub):
    """The hub path (no network here: load_dataset returns an in-memory dataset of PNG bytes) keeps the
    same rows a local folder with the same count would."""
    import io

    import datasets

    def png(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), v, np.uint8)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": f"{v}.png"}
    ds = datasets.Dataset.from_dict({"image": [png(10 * i) for i in range(10)], "text": [str(i) for i in range(10)]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds.cast_column("image", datasets.Image()))
    data = load_imagefolder("someone/shades", 16, max_rows=4)
    assert [int(p[0, 0, 0]) for p in data.pixels] == \
        [int(p[0, 0, 0]) for p in load_imagefolder(str(_shades(tmp_path / "local")), 16, max_rows=4).pixels]
    assert len(data.pixels) == 4 and data.captions == [str(int(p[0, 0, 0]) // 10) for p in data.pixels]


def test_a_hub_datasets_captions_are_read_without_its_images(monkeypatch, hub):
    """The references' prompts come from every caption; on the hub path that is the caption column
    alone (iterating the rows would read every image's bytes first)."""
    import datasets

    from core.config import ReferenceData
    from evaluation.evaluate import reference_captions

    ds = datasets.Dataset.from_dict({"image": [b"\x89PNG not read"] * 6, "text": [f"shade {i}" for i in range(6)]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds.select([5, 3, 1, 0, 2]))  # a split's rows
    monkeypatch.setattr(datasets.Dataset, "__iter__", lambda self: pytest.fail("the rows were iterated"))
    refs = ReferenceData(path="someone/shades")
    assert reference_captions(refs) == [f"shade {i}" for i in (5, 3, 1, 0, 2)]
    blank = datasets.Dataset.from_dict({"image": [b""] * 2, "text": ["one", " "]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: blank)
    with pytest.raises(UserError, match="row 1 has no caption in column 'text'"):
        reference_captions(ReferenceData(path="someone/blanks"))


def test_a_hub_dataset_is_loaded_once_for_its_captions_and_images(tmp_path, monkeypatch, hub):
    """The gate reads the references' captions, then their images: one load of the split (online, each
    load asks the hub for the latest revision)."""
    import io

    import datasets

    from core.config import ReferenceData
    from evaluation.evaluate import dataset_references, reference_captions

    def png(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), v, np.uint8)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": f"{v}.png"}
    ds = datasets.Dataset.from_dict({"image": [png(40 * i) for i in range(4)], "text": [f"s{i}" for i in range(4)]})
    loads = []

    def load_dataset(*a, **k):
        loads.append(a)
        return ds.cast_column("image", datasets.Image())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    refs = ReferenceData(path="someone/shades")
    assert reference_captions(refs) == ["s0", "s1", "s2", "s3"]
    assert [int(p[0, 0, 0]) for p in dataset_references(refs, 16)] == [0, 40, 80, 120]
    assert len(loads) == 1, loads


def _photo_like(folder, n=12, seed=0):
    """Images the shipped VAE (trained on flat shapes) cannot represent: fine random texture."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        _write(folder, f"{i}.png", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
        (folder / f"{i}.txt").write_text(f"texture number {i}")


@pytest.mark.slow
def test_data_check_warns_only_when_the_vae_cannot_represent_the_data(micro_data, tmp_path):
    noise = tmp_path / "noise"
    _photo_like(noise)
    bad = run_cli("data", "check", str(noise), "--model", str(BASE), "--samples", "8")
    assert bad.returncode == 0, bad.stderr
    assert "warning:" in bad.stdout and "train.what=vae" in bad.stdout and "12 images" in bad.stdout
    good = run_cli("data", "check", str(micro_data), "--model", str(BASE), "--samples", "8")
    assert good.returncode == 0, good.stderr
    assert "warning:" not in good.stdout and "fits" in good.stdout


def test_training_reports_the_fit_and_can_refuse_a_poor_one(micro_model, tmp_path):
    from core.config import load_config
    from tests.conftest import micro_overrides
    from training.config import TrainConfig
    from training.run import Run

    noise = tmp_path / "noise"
    _photo_like(noise, n=8)
    cfg = load_config(TrainConfig, None, micro_overrides(micro_model, noise, tmp_path / "out", 1)
                      + ["data.on_poor_fit=error", "data.min_vae_psnr=99"])
    with pytest.raises(UserError, match="train.what=vae"):
        Run(cfg)
    assert not (tmp_path / "out").exists()
    run = Run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_poor_fit": "warn"})}))
    assert run.fit["images"] == 8 and run.fit["psnr_db"] < 99
    assert run.data_summary["images"] == 8 and run.data_summary["unique_captions"] == 8


def test_autoencoder_run_continues_exactly_after_an_interruption(micro_model, tmp_path):
    """A stopped ``t2i train-autoencoder`` run picks up from OUT/resume and ends with the same weights
    as one that ran through; other settings are refused rather than mixed in."""
    from safetensors.torch import load_file

    from training.autoencoder import main
    from training.checkpoints import _load_state
    from training.config import AutoencoderConfig

    def cfg(out, **kw):
        return AutoencoderConfig(base=str(micro_model), output_dir=str(out), steps=4, batch_size=4,
                                 eval_every=2, held_out=["skimage:coffee"], **kw)

    main(cfg(tmp_path / "through"))
    main(cfg(tmp_path / "stopped"), stop_at=3)
    assert _load_state(tmp_path / "stopped/resume/state.safetensors")["step"] == 3
    main(cfg(tmp_path / "stopped"))
    a = load_file(tmp_path / "through/resume/vae.safetensors")
    b = load_file(tmp_path / "stopped/resume/vae.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "stopped/metrics.jsonl")]
    assert steps == [0, 2, 4]
    with pytest.raises(UserError, match="learning_rate"):
        main(cfg(tmp_path / "stopped", learning_rate=1e-3))

    # a run saved before a setting existed ran with its default: it continues (and is refused otherwise)
    from training.checkpoints import _save_state
    main(cfg(tmp_path / "older"), stop_at=3)
    state = _load_state(tmp_path / "older/resume/state.safetensors")
    for k in ("select_by", "min_psnr_photos"):
        del state["config"][k]
    _save_state(tmp_path / "older/resume/state.safetensors", state)
    with pytest.raises(UserError, match="select_by"):
        main(cfg(tmp_path / "older", select_by="synthetic"))
    main(cfg(tmp_path / "older"))
    c = load_file(tmp_path / "older/resume/vae.safetensors")
    assert all(a[k].equal(c[k]) for k in a)


def test_a_decoder_refinement_keeps_the_latents_and_the_photo_floor(micro_model, tmp_path):
    """decoder_only leaves the encoder (so the latents a UNet was trained on) bit for bit; select_by
    picks the kept checkpoint by the synthetic world's PSNR, never one under min_psnr_photos."""
    from diffusers import AutoencoderKL

    from training.autoencoder import _better, main
    from training.config import AutoencoderConfig

    def cfg(out, **kw):
        return AutoencoderConfig(base=str(micro_model), output_dir=str(out), steps=4, batch_size=4, eval_every=2,
                                 held_out=["skimage:coffee"], decoder_only=True, select_by="synthetic", **kw)

    kept = main(cfg(tmp_path / "refine"))
    rows = [json.loads(line) for line in open(tmp_path / "refine/metrics.jsonl")]
    assert kept == max(rows[1:], key=lambda r: r["psnr_synthetic"])
    old = AutoencoderKL.from_pretrained(micro_model / "vae").state_dict()
    new = AutoencoderKL.from_pretrained(tmp_path / "refine/vae").state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(new[k].equal(old[k]) for k in frozen)
    assert any(not new[k].equal(old[k]) for k in old if k.startswith("decoder."))

    assert main(cfg(tmp_path / "floor", min_psnr_photos=99.0))["step"] == 0  # nothing reached the floor
    assert not (tmp_path / "floor/vae").exists()
    from tests.conftest import run_cli
    res = run_cli("train-autoencoder", f"base={micro_model}", f"output_dir={tmp_path / 'floor-cli'}", "steps=4",
                  "batch_size=4", "eval_every=2", "held_out=[skimage:coffee]", "decoder_only=true",
                  "min_psnr_photos=99")
    assert res.returncode == 2 and "nothing was written" in res.stderr and "Traceback" not in res.stderr

    base = {"step": 0, "psnr_photos": 26.0, "psnr_synthetic": 32.0}
    sharper_world = {"step": 2, "psnr_photos": 25.6, "psnr_synthetic": 32.8}
    sharper_photos = {"step": 4, "psnr_photos": 26.5, "psnr_synthetic": 32.5}
    c = cfg(tmp_path, min_psnr_photos=25.5)
    assert _better(sharper_world, base, c) and not _better(sharper_photos, sharper_world, c)
    assert not _better({**sharper_world, "psnr_photos": 25.4}, base, c)
    assert _better(sharper_photos, sharper_world, c.model_copy(update={"select_by": "photos"}))


def test_a_fresh_autoencoder_with_more_latent_channels_swaps_into_a_model_that_then_trains(
        micro_model, micro_data, tmp_path):
    """new_architecture trains a fresh VAE (8 latent channels here; no old latents to anchor to, so
    anchor_weight must be 0) and gives it SD's latent scale; model.vae puts it into a model, whose UNet
    gets conv_in/conv_out for 8 channels, trains, saves and draws at the model's size."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from core.config import load_config
    from tests.conftest import micro_overrides
    from training.autoencoder import main as train_autoencoder
    from training.config import AutoencoderConfig, TrainConfig
    from training.train import main as train

    arch = {"block_out_channels": [32, 32], "latent_channels": 8, "layers_per_block": 1, "norm_num_groups": 8}
    with pytest.raises(UserError, match="anchor_weight: 0"):
        train_autoencoder(AutoencoderConfig(base=str(micro_model), output_dir=str(tmp_path / "x"), steps=1,
                                            new_architecture=arch, held_out=["skimage:coffee"]))
    micro_vae = AutoencoderKL.from_pretrained(micro_model / "vae")
    arch["block_out_channels"] = micro_vae.config.block_out_channels  # the same downsampling as the model's
    arch["norm_num_groups"] = micro_vae.config.norm_num_groups
    train_autoencoder(AutoencoderConfig(base=str(micro_model), output_dir=str(tmp_path / "ae"), steps=2, batch_size=4,
                                        eval_every=2, anchor_weight=0.0, new_architecture=arch,
                                        held_out=["skimage:coffee"]))
    vae = AutoencoderKL.from_pretrained(tmp_path / "ae" / "vae")
    assert vae.config.latent_channels == 8 and vae.config.scaling_factor != 1.0

    out = tmp_path / "run"
    train(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, out, 2)
                      + [f"model.vae={tmp_path / 'ae' / 'vae'}"]))
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None)
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8 == pipe.vae.config.latent_channels
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    img = pipe("a red circle", num_inference_steps=2, height=size, width=size, output_type="np").images[0]
    assert img.shape == (size, size, 3)
    with pytest.raises(UserError, match="train.what=unet"):
        train(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, tmp_path / "lora", 2)
                          + [f"model.vae={tmp_path / 'ae' / 'vae'}", "train.what=lora"]))
    with pytest.raises(UserError, match="not an AutoencoderKL folder"):
        train(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, tmp_path / "bad", 2)
                          + [f"model.vae={tmp_path}"]))


def test_the_shipped_autoencoder_represents_photos_it_never_saw():
    """A regression floor on the committed weights: crops of the four photos held out of the VAE's
    training (docs/base-model.md) come back above 25 dB (the former shapes-only VAE: 12.8 dB),
    grayscale stays grayscale and the synthetic world comes back sharper than through the
    shapes-only VAE (32.6 dB; the refined decoder: 33.7)."""
    import torch
    from diffusers import AutoencoderKL

    from training.autoencoder import eval_sets, evaluate
    from training.photos import packaged_photos

    held_out = ["sklearn:china.jpg", "sklearn:flower.jpg", "skimage:coffee", "skimage:camera"]
    vae = AutoencoderKL.from_pretrained(BASE / "vae", torch_dtype=torch.float32)
    with torch.no_grad():
        m = evaluate(vae, vae, eval_sets(packaged_photos(), held_out, 64))
    assert m["psnr_photos"] >= 25.0, m
    assert m["gray_chroma_err"] <= 2.0, m
    assert m["psnr_synthetic"] >= 33.0, m
