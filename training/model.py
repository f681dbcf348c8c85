"""One object owns both the training loss and sampling (k-diffusion's ``Denoiser`` idea), so the
noise schedule, prediction type and conditioning used to train are the ones used to generate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from PIL import Image

from training.presets import Components


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Peels DDP / torch.compile wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def foreground_mask(images_uint8: torch.Tensor, latent_hw: int, threshold: int = 24) -> torch.Tensor:
    """uint8 NHWC images on a flat background -> float N x 1 x latent_hw x latent_hw, 1 where any pixel
    of the cell differs from the background colour (the median of the border pixels) by > threshold."""
    x = images_uint8.int()
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)  # N x 4W x C
    bg = border.median(dim=1).values[:, None, None, :]
    fg = ((x - bg).abs().amax(dim=-1) > threshold).float()[:, None]
    return F.adaptive_max_pool2d(fg, latent_hw)


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


def snr_loss_weights(snr: torch.Tensor, gamma: float, prediction_type: str, kind: str = "min_snr") -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023): the x0 loss weighted by min(SNR, gamma).

    For v-prediction that is min(SNR, gamma) / (SNR + 1), which goes to 0 at the noisy end, and with
    zero terminal SNR the noisiest timesteps (where the layout and the kind of shape are decided)
    then teach nothing. ``min_snr_plus_one`` weights the x0 loss by min(SNR + 1, gamma) instead:
    v-loss weight min(1, gamma / (SNR + 1)), full weight at the noisy end and the same down-weighting
    of the clean end. It needs v-prediction (for epsilon it would divide by SNR = 0).
    """
    x0_weight = torch.minimum(snr + 1 if kind == "min_snr_plus_one" else snr, torch.full_like(snr, gamma))
    return x0_weight / (snr + 1) if prediction_type == "v_prediction" else x0_weight / snr


class LatentDiffusion:
    """Latent diffusion over an SD pipeline's parts (Rombach et al. 2022).

    ``loss`` is the denoising objective with optional min-SNR-gamma weighting (Hang et al. 2023)
    and noise offset; ``pipeline``/``sample`` wrap the same in-memory modules for generation.
    """

    def __init__(self, comps: Components, prediction_type: str | None = None, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, zero_terminal_snr: bool = False,
                 timestep_bias: tuple[str, float, float] = ("none", 0.25, 1.0), snr_weighting: str = "min_snr"):
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
        self.snr_weighting = snr_weighting
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
    def loss(self, latents: torch.Tensor, text_emb: torch.Tensor, focus: torch.Tensor | None = None,
             focus_weighting: str | None = None, preserve: tuple | None = None,
             pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss at uniformly drawn timesteps (DDPM, Ho et al. 2020).

        ``focus`` (bool per sample) marks the images that teach something new; with ``focus_weighting``
        their min-SNR weights use that kind instead of the model's ``snr_weighting``.
        ``preserve`` = (teacher UNet, teacher text embeddings, bool mask, weight) adds weight x the MSE
        between the prediction and the teacher's on the same noisy latents, for the masked images,
        with equal weight at every timestep (averaged over the whole batch).
        ``pixel_weights`` (N x 1 x h x w) weights the latent cells of the denoising loss (a weighted mean
        per image, so all-ones is the plain loss).
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
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        if pixel_weights is None:
            per = err.mean(dim=[1, 2, 3])
        else:
            per = (err.mean(dim=1, keepdim=True) * pixel_weights).sum(dim=[1, 2, 3]) / pixel_weights.sum(dim=[1, 2, 3])
        if self.snr_gamma is not None:
            snr = compute_snr(sched, t)
            weight = snr_loss_weights(snr, self.snr_gamma, sched.config.prediction_type, self.snr_weighting)
            if focus is not None and focus_weighting and focus_weighting != self.snr_weighting:
                focus_weight = snr_loss_weights(snr, self.snr_gamma, sched.config.prediction_type, focus_weighting)
                weight = torch.where(focus.to(weight.device), focus_weight, weight)
            per = per * weight
        loss = per.mean()
        if preserve is not None:
            teacher, teacher_emb, mask, weight = preserve
            if mask.any():  # checked on the host: no device sync
                mask = mask.to(latents.device)
                with torch.no_grad():
                    want = teacher(noisy[mask], t[mask], teacher_emb[mask], return_dict=False)[0]
                loss = loss + weight * F.mse_loss(pred[mask].float(), want.float(), reduction="sum") \
                    / (pred[0].numel() * len(pred))
        return loss

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
    def pipeline(self, scheduler_config: dict | None = None) -> StableDiffusionPipeline:
        """A pipeline over the in-memory modules: no weights are loaded or copied."""
        cfg = dict(scheduler_config or self.c.sample_scheduler_config)
        cfg["prediction_type"] = self.noise_scheduler.config.prediction_type
        pipe = StableDiffusionPipeline(
            vae=unwrap(self.vae), text_encoder=unwrap(self.text_encoder), tokenizer=self.tokenizer,
            unet=unwrap(self.unet), scheduler=DPMSolverMultistepScheduler.from_config(cfg),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 20, guidance: float = 5.0, seed: int = 0,
               resolution: int | None = None) -> list[Image.Image]:
        pipe = self.pipeline()
        res = resolution or self.c.resolution
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    height=res, width=res).images


def image_grid(images: list[Image.Image], cols: int | None = None, labels: list[str] | None = None) -> Image.Image:
    """Tiles images into one grid (optionally with a caption strip under each)."""
    from PIL import ImageDraw

    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    strip = 12 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(im, (x, y))
        if labels:
            draw.text((x + 1, y + h), labels[i][: max(4, w // 6)], fill="black")
    return grid
