"""A few-step micro training run: checkpoints, exact resume, LoRA, VAE stage, diffusers-loadable output."""
import json

import pytest
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.conftest import forbid_unpickling, micro_overrides
from core.config import load_config
from training.config import TrainConfig
from training.train import main


def _cfg(micro_model, micro_data, out, steps=4, extra=()):
    return load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, out, steps) + list(extra))


def _unet_weights(model_dir):
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def full_run(micro_model, micro_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    report = main(_cfg(micro_model, micro_data, out, steps=4, extra=["train.train_text_encoder=true",
                                                                      "logging.sample_every=2",
                                                                      "logging.log_every=1"]))
    return out, report


def test_run_writes_a_diffusers_model_dir(full_run):
    out, report = full_run
    model = out / "model"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model / part).is_dir()
    assert (model / "model_index.json").exists() and (model / "t2i_train.yaml").exists()
    assert not list(model.rglob("*.bin"))  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(model)  # no code of ours
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["steps"] == 4 and saved["images_per_s"] > 0 and saved["final_loss"] == report["final_loss"]
    assert (out / "config.yaml").exists()


def test_samples_and_tensorboard(full_run):
    out, report = full_run
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "logs" / "t2i"))
    ev.Reload()
    loss, lr = ev.Scalars("loss"), ev.Scalars("lr")
    assert [e.step for e in loss] == [e.step for e in lr] == [1, 2, 3, 4]
    assert loss[-1].value == pytest.approx(report["final_loss"], rel=1e-5)  # the values logged are the run's
    samples = ev.Images("samples")
    assert [e.step for e in samples] == [2, 4]
    with Image.open(out / "samples" / "step-0000004.png") as grid:  # the logged image is the saved grid
        assert (samples[-1].width, samples[-1].height) == grid.size


def test_checkpoint_limit_and_atomic_names(full_run):
    out, _ = full_run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-0000002", "checkpoint-0000004"]  # total_limit=2 keeps the newest two


@pytest.mark.slow
def test_resume_is_exact_and_passes_over_a_corrupt_latest(micro_model, micro_data, tmp_path, capsys, monkeypatch):
    """A truncated latest checkpoint is passed over (saying so) and moved aside with the abandoned run's
    newer ones; resuming from step 2 of a 6-step run, with EMA, lands on bit-identical weights
    (optimizer, LR, EMA, RNG, data order)."""
    import shutil

    ema = ["checkpoint.total_limit=null", "train.ema_decay=0.9", "train.ema_warmup=false"]
    straight = tmp_path / "straight"
    main(_cfg(micro_model, micro_data, straight, steps=6, extra=ema))
    assert not list(straight.rglob("*.pkl")) and not list(straight.rglob("*.bin"))  # no pickles written either
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(straight / "checkpoints" / f"checkpoint-000000{step}",
                        resumed / "checkpoints" / f"checkpoint-000000{step}")
    weights = resumed / "checkpoints" / "checkpoint-0000004" / "model_0.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a crash mid-write on a filesystem without ordering
    capsys.readouterr()
    forbid_unpickling(monkeypatch)  # the resume reads data only
    report = main(_cfg(micro_model, micro_data, resumed, steps=6, extra=ema + ["checkpoint.resume_from=latest"]))
    out = capsys.readouterr().out
    assert "skipping checkpoint-0000004" in out and "resumed from" in out and "checkpoint-0000002" in out
    assert report["steps_this_run"] == 4
    assert [p.name for p in (resumed / "checkpoints" / "abandoned").glob("*/*")] == ["checkpoint-0000004"]
    assert sorted(p.name for p in (resumed / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-0000002", "checkpoint-0000004", "checkpoint-0000006"]  # 4 written again by the resumed run
    a, b = _unet_weights(straight / "model"), _unet_weights(resumed / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_lora_saves_adapter_and_fused_model(micro_model, micro_data, tmp_path):
    out = tmp_path / "lora"
    main(_cfg(micro_model, micro_data, out, steps=3, extra=["train.what=lora", "lora.rank=4",
                                                             "train.learning_rate=1e-2"]))
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    fused = _unet_weights(out / "model")
    base = _unet_weights(micro_model)
    assert set(fused) == set(base)  # adapters fused away: a plain UNet
    changed = [k for k in base if not torch.equal(base[k], fused[k])]
    assert changed and all("attn" in k for k in changed)  # only attention projections moved
    pipe = StableDiffusionPipeline.from_pretrained(micro_model)
    pipe.load_lora_weights(out / "lora")  # the adapter alone loads into the base too


def test_vae_stage_sets_latent_scale(micro_model, micro_data, tmp_path):
    out = tmp_path / "vae"
    main(_cfg(micro_model, micro_data, out, steps=2, extra=["train.what=vae", "train.ema_decay=null"]))
    cfg = json.loads((out / "model" / "vae" / "config.json").read_text())
    # SD's rule: 1 / std of the trained VAE's latents of the training images (posterior samples: ~1%)
    from diffusers import AutoencoderKL

    from core.images import to_pixels
    from core.datasets import load_imagefolder

    vae = AutoencoderKL.from_pretrained(out / "model" / "vae").eval()
    x = to_pixels(torch.from_numpy(load_imagefolder(str(micro_data), 32).pixels))
    with torch.no_grad():
        std = vae.encode(x).latent_dist.sample().std().item()
    assert cfg["scaling_factor"] == pytest.approx(1 / std, rel=0.05)


@pytest.mark.slow
def test_zero_terminal_snr_is_trained_and_saved(micro_model, micro_data, tmp_path):
    from diffusers import DDPMScheduler

    from core.errors import UserError

    out = tmp_path / "zsnr"
    main(_cfg(micro_model, micro_data, out, steps=2,
              extra=["train.prediction_type=v_prediction", "train.zero_terminal_snr=true", "train.snr_gamma=null",
                     "train.timestep_bias=later", "train.timestep_bias_multiplier=5"]))
    sched = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "v_prediction"
    assert float(DDPMScheduler.from_config(sched).alphas_cumprod[-1]) == 0.0  # x_T is pure noise
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")  # diffusers samples it unaided
    assert pipe(["a red circle"], num_inference_steps=2, output_type="np").images.shape[0] == 1
    with pytest.raises(UserError, match="v_prediction"):
        main(_cfg(micro_model, micro_data, tmp_path / "bad", steps=1, extra=["train.zero_terminal_snr=true"]))


def test_timestep_bias_draws_the_chosen_end_more_often():
    from training.model import timestep_weights

    assert timestep_weights(1000, "none", 0.25, 10.0) is None
    assert timestep_weights(1000, "later", 0.25, 1.0) is None
    later = timestep_weights(1000, "later", 0.1, 9.0)
    assert torch.isclose(later.sum(), torch.tensor(1.0))
    assert torch.isclose(later[900:].sum(), torch.tensor(0.5))  # 100 steps x 9 against 900 x 1
    assert later[999] == later[900] and later[0] * 9 == pytest.approx(later[999].item())
    earlier = timestep_weights(1000, "earlier", 0.1, 9.0)
    assert torch.isclose(earlier[:100].sum(), torch.tensor(0.5))
    drawn = torch.multinomial(later, 20000, replacement=True)
    assert 0.47 < (drawn >= 900).float().mean().item() < 0.53


def test_loss_draws_timesteps_with_the_bias(micro_model):
    from training.model import LatentDiffusion
    from training.presets import load_components

    model = LatentDiffusion(load_components(str(micro_model)), timestep_bias=("later", 0.1, 1000.0))
    seen = []
    add_noise = model.noise_scheduler.add_noise
    model.noise_scheduler.add_noise = lambda x, n, t: (seen.append(t), add_noise(x, n, t))[1]
    latents = torch.randn(64, 4, 8, 8)
    model.loss(latents, model.encode_text(["a red circle"] * 64).detach())
    assert (torch.cat(seen) >= 900).float().mean().item() > 0.9  # uniform draws would give ~0.1


def test_min_snr_weights_and_text_encoder_group(micro_model, micro_data, tmp_path):
    from training.model import snr_loss_weights
    from training.train import setup

    snr = torch.tensor([0.5, 2.0, 100.0])
    assert snr_loss_weights(snr, 5.0, "v_prediction").tolist() == pytest.approx([0.5 / 1.5, 2 / 3, 5 / 101])
    assert snr_loss_weights(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 1.0, 0.05])
    extra = ["train.train_text_encoder=true", "train.lr_scheduler=constant", "train.warmup_steps=0",
             "train.learning_rate=1e-4"]
    run = setup(_cfg(micro_model, micro_data, tmp_path / "a", steps=1, extra=extra))
    unet, text = run.optimizer.param_groups
    assert unet["lr"] == pytest.approx(1e-4) and text["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in text["params"]} == {id(p) for p in run.model.text_encoder.parameters()}
    assert {id(p) for p in unet["params"]} == {id(p) for p in run.model.unet.parameters()}


def test_non_finite_loss_stops_cleanly(micro_model, micro_data, tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "nan"
    res = run_cli("train", "configs/base/vae.yaml", *micro_overrides(micro_model, micro_data, out, steps=6),
                  "data.synthetic=null", "train.what=unet", "train.learning_rate=1e30", "train.max_grad_norm=0",
                  "checkpoint.every=1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "loss became" in res.stderr and "Last good checkpoint" in res.stderr
    assert not (out / "model").exists()
    assert list((out / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow
def test_ema_decay_applies_from_the_first_step_without_warmup(micro_model, micro_data, tmp_path):
    # diffusers' warm-up caps the decay at (1 + s) / (10 + s): 0.4 at the 6th step, whatever ema_decay says
    start = _unet_weights(micro_model)
    extra = ["train.learning_rate=3e-3", "train.lr_scheduler=constant", "checkpoint.every=100"]
    moved, reports = {}, {}
    for name, ema in {"none": ["train.ema_decay=null"], "warmup": ["train.ema_decay=0.999"],
                      "constant": ["train.ema_decay=0.999", "train.ema_warmup=false"]}.items():
        out = tmp_path / name
        reports[name] = main(_cfg(micro_model, micro_data, out, steps=6, extra=extra + ema))
        saved = _unet_weights(out / "model")
        moved[name] = sum((saved[k].float() - start[k].float()).pow(2).sum().item() for k in start)
    assert reports["none"]["ema_decay_last"] is None
    assert reports["warmup"]["ema_decay_last"] == pytest.approx(6 / 15)
    assert reports["constant"]["ema_decay_last"] == pytest.approx(0.999)
    # the saved model is the average: held near the start at 0.999, close to the last weights with the warm-up
    assert moved["constant"] < 0.3 * moved["warmup"] < 0.3 * moved["none"]


@pytest.mark.slow
def test_focus_token_learning_rate_moves_only_the_focus_words_embeddings(micro_model, micro_data, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    from core.errors import UserError
    from training.train import setup

    extra = ["train.train_text_encoder=true", "train.focus_words=[Circle]",
             "train.focus_token_learning_rate=1e-2", "train.ema_decay=0.5", "train.ema_warmup=false"]
    run = setup(_cfg(micro_model, micro_data, tmp_path / "s", steps=1, extra=extra))
    *_, tokens = run.optimizer.param_groups
    assert tokens["lr"] == pytest.approx(1e-2) and tokens["weight_decay"] == 0.0
    assert tokens["params"][0] is run.model.text_encoder.get_input_embeddings().weight
    main(_cfg(micro_model, micro_data, tmp_path / "r", steps=3, extra=extra))
    ids = [i for i in CLIPTokenizer.from_pretrained(micro_model / "tokenizer")("circle").input_ids[1:-1]]

    def embeddings(path):
        return CLIPTextModel.from_pretrained(path / "text_encoder").get_input_embeddings().weight.detach().float()
    before, after = embeddings(micro_model), embeddings(tmp_path / "r" / "model")
    moved = (after - before).norm(dim=1)
    assert moved[ids].min() > 0.01  # three AdamW steps at 1e-2 move each coordinate by up to 0.03
    others = torch.ones(len(moved), dtype=torch.bool)
    others[ids] = False
    assert moved[others].max() < 1e-3  # the rest only by the fp16 round trip of the saved model
    # with the text encoder otherwise frozen, the focus rows are the only weights of it that move
    frozen = [e for e in extra if not e.startswith("train.train_text_encoder")]
    main(_cfg(micro_model, micro_data, tmp_path / "f", steps=3, extra=frozen))
    te0 = CLIPTextModel.from_pretrained(micro_model / "text_encoder").state_dict()
    te1 = CLIPTextModel.from_pretrained(tmp_path / "f" / "model" / "text_encoder").state_dict()
    changed = {k for k in te0 if (te1[k].float() - te0[k].float()).abs().max() > 1e-3}
    assert [k.split(".")[-3:] for k in changed] == [["embeddings", "token_embedding", "weight"]]
    assert (embeddings(tmp_path / "f" / "model") - before).norm(dim=1)[ids].min() > 0.01
    with pytest.raises(UserError, match="focus words"):
        setup(_cfg(micro_model, micro_data, tmp_path / "n", steps=1, extra=["train.focus_token_learning_rate=1e-2"]))


def test_planted_pickle_in_a_checkpoint_is_never_loaded(full_run, micro_model, micro_data, tmp_path):
    """A checkpoint whose files were swapped for a pickle that would write a file, and one in the old
    pickled format, are refused in one line; nothing is written."""
    import shutil

    from core.errors import UserError
    from tests.conftest import evil_pickle

    out, _ = full_run
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    shutil.copytree(out / "checkpoints" / "checkpoint-0000004", run / "checkpoints" / "checkpoint-0000004")
    (run / "checkpoints" / "checkpoint-0000004" / "state.safetensors").write_bytes(evil_pickle(marker))
    old = run / "checkpoints" / "checkpoint-0000002"  # accelerate's layout, as older t2i wrote it
    old.mkdir()
    (old / "train_state.json").write_text('{"global_step": 2}')
    for name in ("random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"):
        (old / name).write_bytes(evil_pickle(marker))
    with pytest.raises(UserError) as err:
        main(_cfg(micro_model, micro_data, run, steps=6, extra=["checkpoint.resume_from=latest"]))
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint-0000004" in msg and "checkpoint-0000002" in msg
    assert not marker.exists()
    with pytest.raises(UserError, match="older t2i as pickles"):
        main(_cfg(micro_model, micro_data, run, steps=6, extra=[f"checkpoint.resume_from={old}"]))
    assert not marker.exists()


def test_caches_fill_as_batches_need_them_with_the_values_of_an_upfront_fill(micro_model, micro_data, tmp_path):
    """train.cache_fill=lazy starts training without encoding anything; a batch encodes the blocks of
    rows it needs, and every cached value is bit-identical to an up-front fill's (exact resume)."""
    from training.run import Run

    base = ["data.flip=true", "train.cache_batch_size=4"]
    lazy = Run(_cfg(micro_model, micro_data, tmp_path / "lazy", extra=base))
    assert lazy.lat_mean is None and not lazy.lat_done.any() and not lazy.text_done.any()
    upfront = Run(_cfg(micro_model, micro_data, tmp_path / "up", extra=base + ["train.cache_fill=upfront"]))
    assert upfront.lat_done.all() and upfront.text_done.all()
    # the first batch encodes its own images, a block of 4 at a time, and nothing else
    first = torch.as_tensor(lazy.batch_indices(0))
    assert len(first) == 8 and lazy.cfg.train.batch_size == 8
    lazy.cached_latents(first)
    assert int(lazy.lat_done.sum()) == 2
    lazy.cached_text([lazy.data.captions[i] for i in first.tolist()])
    assert int(lazy.text_done.sum()) == 1 < len(lazy.text_done)
    rows = torch.tensor([5, 50, 51, 95])  # 48 images: rows 48-95 are the mirror images
    mean, std = lazy.cached_latents(rows)
    assert torch.equal(mean, upfront.lat_mean[rows]) and torch.equal(std, upfront.lat_std[rows])
    assert not torch.equal(upfront.lat_mean[5], upfront.lat_mean[53])  # a mirror image's latent is its own
    caps = [lazy.data.captions[i] for i in (0, 7, 3)] + [""]
    assert torch.equal(lazy.cached_text(caps), upfront.cached_text(caps))
    assert torch.equal(lazy.cached_latents(first)[0], upfront.lat_mean[first])
