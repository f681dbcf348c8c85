"""The trainer and the sampling engine keep every tensor on the models' device: checked on this CPU
with the models on the ``meta`` device under tests.device_check (what a CUDA run would refuse)."""
import pytest
import torch

from tests.conftest import micro_overrides
from tests.device_check import META, DeviceMismatch, runs_on_one_device, strict_devices, to_meta


def test_the_check_refuses_what_cuda_refuses_and_allows_what_it_allows():
    conv = torch.nn.Conv2d(3, 4, 3).to(META)
    with pytest.raises(DeviceMismatch, match="cpu.*meta"):
        runs_on_one_device(conv, torch.randn(1, 3, 8, 8))  # meta alone would accept this silently
    assert runs_on_one_device(conv, torch.randn(1, 3, 8, 8, device=META)) == "finished"
    x = torch.randn(4, 3, device=META)
    assert runs_on_one_device(lambda: (x * torch.tensor(2.0))[torch.tensor([0, 2])].to(META)) == "finished"
    assert runs_on_one_device(lambda: x.sum().item()) .endswith(".item)")
    assert runs_on_one_device(lambda: x.cpu()).startswith("reached a value")
    with pytest.raises(DeviceMismatch, match="generator"):
        with strict_devices():
            torch.randn(2, device=META, generator=torch.Generator("cpu"))
    with pytest.raises(DeviceMismatch, match="generator"):
        with strict_devices():
            x.normal_(generator=torch.Generator("cpu"))
    with pytest.raises(DeviceMismatch, match="indexed"):
        runs_on_one_device(lambda: torch.zeros(4)[torch.tensor([0, 1], device=META)])


def _run_on_meta(micro_model, micro_data, tmp_path, monkeypatch, *extra):
    from accelerate import Accelerator

    from core.config import load_config
    from training.config import TrainConfig
    from training.run import Run

    run = Run(load_config(TrainConfig, None, micro_overrides(micro_model, micro_data, tmp_path / "out", 2) + list(extra)))
    to_meta(run.model.vae, run.model.text_encoder, run.model.unet)
    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))
    return run


def test_the_vae_stage_keeps_its_images_on_the_vaes_device(micro_model, micro_data, tmp_path, monkeypatch):
    """The VAE stage's latent scale and sample grid used to encode CPU images with a CUDA VAE."""
    from training.train import _set_latent_scale, sample_grid, train_step

    run = _run_on_meta(micro_model, micro_data, tmp_path, monkeypatch, "train.what=vae", "train.ema_decay=null")
    assert runs_on_one_device(train_step, run, 0) == "finished"
    assert runs_on_one_device(_set_latent_scale, run).startswith("reached a value")
    assert runs_on_one_device(sample_grid, run).startswith("reached a value")


@pytest.mark.parametrize("extra", [[], ["train.cache_fill=upfront", "data.flip=true"],
                                   ["train.cache=false", "train.train_text_encoder=true"]],
                         ids=["cached-lazily", "cached-upfront", "uncached"])
def test_the_unet_stage_caches_trains_and_samples_on_one_device(micro_model, micro_data, tmp_path, monkeypatch, extra):
    from core.sampling import GenerationRequest
    from training.train import train_step

    run = _run_on_meta(micro_model, micro_data, tmp_path, monkeypatch, "train.noise_offset=0.05",
                       "train.snr_gamma=5", *extra)
    assert runs_on_one_device(run.build_caches) == "finished"
    assert runs_on_one_device(train_step, run, 0) == "finished"
    gen = run.model.generator()
    req = GenerationRequest("a red circle", num_inference_steps=2, guidance_scale=3.0, seed=0, width=32, height=32)
    assert runs_on_one_device(gen.generate, [req]).startswith("reached a value")
