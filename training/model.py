"""One object owns both the training loss and sampling (k-diffusion's ``Denoiser`` idea), so the
noise schedule, prediction type and conditioning used to train are the ones used to generate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from training.presets import Components


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Peels DDP / torch.compile wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def timestep_weights(n: int, strategy: str, portion: float, multiplier: float) -> torch.Tensor | None:
    """Sampling weights over the ``n`` training timesteps: the ``portion`` at the noisy end (``later``)
    or the clean end (``earlier``) drawn ``multiplier`` times as often; None for uniform."""
    if strategy == "none" or multiplier == 1.0:
        return None
    w = torch.ones(n)
    k = max(1, int(round(n * portion)))
    if strategy == "later":
        w[n - k:] = multiplier
    else:
        w[:k] = multiplier
    return w / w.sum()


def snr_loss_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023): the x0 loss weighted by min(SNR, gamma),
    expressed for the model's prediction target (epsilon: / SNR; v: / (SNR + 1))."""
    x0_weight = torch.minimum(snr, torch.full_like(snr, gamma))
    return x0_weight / (snr + 1) if prediction_type == "v_prediction" else x0_weight / snr


class LatentDiffusion:
    """Latent diffusion over an SD pipeline's parts (Rombach et al. 2022).

    ``loss`` is the denoising objective with optional min-SNR-gamma weighting (Hang et al. 2023)
    and noise offset; ``pipeline``/``sample`` wrap the same in-memory modules for generation.
    """

    def __init__(self, comps: Components, prediction_type: str | None = None, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, zero_terminal_snr: bool = False,
                 timestep_bias: tuple[str, float, float] = ("none", 0.25, 1.0)):
        if zero_terminal_snr:  # training and sampling schedules both change; the saved scheduler carries it
            from diffusers import DDPMScheduler

            comps.noise_scheduler = DDPMScheduler.from_config(comps.noise_scheduler.config, rescale_betas_zero_snr=True)
            comps.sample_scheduler_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.c = comps
        self.unet = comps.unet
        self.text_encoder = comps.text_encoder
        self.vae = comps.vae
        self.tokenizer = comps.tokenizer
        self.noise_scheduler = comps.noise_scheduler
        if prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.timestep_weights = timestep_weights(self.noise_scheduler.config.num_train_timesteps, *timestep_bias)

    # ------------------------------------------------------------------ conditioning
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(ids, return_dict=False)[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the latent distribution (mean, std) before scaling, for caching."""
        dist = unwrap(self.vae).encode(pixels).latent_dist
        return dist.mean, dist.std

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return (mean + std * torch.randn_like(std)) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ losses
    def loss(self, latents: torch.Tensor, text_emb: torch.Tensor,
             prior: tuple[int, float] | None = None) -> torch.Tensor:
        """Denoising loss at drawn timesteps (DDPM, Ho et al. 2020), min-SNR-gamma weighted when set.

        ``prior=(k, weight)``: the first k rows are the user's images and the rest class images (DreamBooth's
        prior preservation): the loss is the mean over the first plus ``weight`` times the mean over the rest.
        """
        noise = torch.randn_like(latents)
        if self.noise_offset:  # lets the model shift mean brightness (flat backgrounds)
            noise = noise + self.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                            device=latents.device)
        bsz = latents.shape[0]
        sched = self.noise_scheduler
        if self.timestep_weights is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=latents.device).long()
        else:
            t = torch.multinomial(self.timestep_weights, bsz, replacement=True).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        pred = self.unet(noisy, t, text_emb, return_dict=False)[0]
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        if self.snr_gamma is not None:
            per = per * snr_loss_weights(compute_snr(sched, t), self.snr_gamma, sched.config.prediction_type)
        if prior is not None:
            k, weight = prior
            if k == 0:  # this process's micro-batch holds class images only (fewer of the user's than processes)
                return weight * per.mean()
            if k < bsz:
                return per[:k].mean() + weight * per[k:].mean()
        return per.mean()

    def vae_loss(self, pixels: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """Reconstruction (L1 + MSE) + KL, the VAE stage of the from-scratch preset.

        The VAE runs through its own ``forward`` (DDP-wrapped when several processes train), so the
        gradients are all-reduced; ``forward`` returns only the reconstruction, so the posterior is
        read off the layer that emits its moments with a forward hook.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        inner = unwrap(self.vae)
        layer = inner.quant_conv if getattr(inner, "quant_conv", None) is not None else inner.encoder
        seen = {}
        hook = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("moments", out))
        try:
            recon = self.vae(pixels, sample_posterior=True).sample
        finally:
            hook.remove()
        dist = DiagonalGaussianDistribution(seen["moments"])
        rec = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        return rec + kl_weight * dist.kl().mean()

    # ------------------------------------------------------------------ sampling
    def generator(self):
        """The one sampling engine over the in-memory modules (no weights copied): what the run draws
        its sample grids with, and what the saved model dir will draw."""
        from core.sampling import generator_from_parts

        device = next(unwrap(self.unet).parameters()).device
        return generator_from_parts(unwrap(self.text_encoder), unwrap(self.unet), unwrap(self.vae), self.tokenizer,
                                    self.c.sampler_config(), device=device)

    def pipeline(self):
        """A diffusers StableDiffusionPipeline over the in-memory modules, for saving the model dir."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        cfg = dict(self.c.sample_scheduler_config)
        cfg["prediction_type"] = self.noise_scheduler.config.prediction_type
        pipe = StableDiffusionPipeline(
            vae=unwrap(self.vae), text_encoder=unwrap(self.text_encoder), tokenizer=self.tokenizer,
            unet=unwrap(self.unet), scheduler=DPMSolverMultistepScheduler.from_config(cfg),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
