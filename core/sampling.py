"""The one sampling loop: classifier-free guided latent diffusion with per-request seed, guidance
and negative prompt inside one batch. Training samples, evaluation, ``t2i generate``, every export
variant and the server all draw through it.

Export variants differ only in their ``Backend`` (how the text encoder, UNet and VAE decoder run: eager,
quantized, compiled, ONNX Runtime); the scheduler, step count and noise are the model's own, so a
exact variant is the same model made faster. Approximate variants (``export.variants.approx``) compute
less per step and are gated by measured quality: ``Generator.guidance_truncation`` (the last fraction
of the steps without the unconditional pass) here, feature caching in the backend. With one request
and no approximation the loop reproduces diffusers' ``StableDiffusionPipeline`` (a test pins it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from core.models import check_size, side_range


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    request_id: str | None = None  # lets a caller cancel it (``Generator.generate(..., cancelled=)``)

    @property
    def unet_rows(self) -> int:
        """UNet batch rows it takes: one per image, two with classifier-free guidance (scale > 1)."""
        return self.num_images * (2 if self.guidance_scale > 1.0 else 1)


class Backend(Protocol):
    """The three networks of an SD pipeline, however they are run."""

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class Generator:
    """``generate(requests) -> images``: the object export's loader returns for every variant."""

    def __init__(self, backend: Backend, tokenizer, scheduler_config: dict, vae_scale: int, latent_channels: int,
                 scaling_factor: float, native_size: int, info: dict | None = None, size_factor: int | None = None,
                 min_size: int | None = None, max_size: int | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale = vae_scale
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.native_size = native_size
        self.size_factor = size_factor or native_size  # image sides must be multiples of this
        lo, hi = side_range(native_size, self.size_factor)
        self.min_size, self.max_size = min_size or lo, max_size or hi  # the sides this variant is offered at
        self.info = info or {}
        self.unet_time_s = 0.0  # accumulated, for the benchmark's UNet time per step
        self.unet_calls = 0
        self.guidance_truncation = 0.0  # the last fraction of the steps runs without the unconditional pass
        self.cache_interval = 1  # >1: the whole UNet every N-th step, its shallow path between (backend.unet_cached)
        self.cache_start = 0.0  # the first fraction of the steps runs the whole UNet, caching or not

    def whole_unet_step(self, i: int, steps: int) -> bool:
        """Whether step ``i`` of ``steps`` runs the whole UNet under feature caching: every step before
        the caching starts (``cache_start`` of them), then every ``cache_interval``-th."""
        first = int(round(steps * self.cache_start))
        return i < first or (i - first) % self.cache_interval == 0

    def guided_steps(self, steps: int) -> int:
        """How many of ``steps`` apply classifier-free guidance (all of them without truncation)."""
        return steps - int(round(steps * self.guidance_truncation))

    def new_scheduler(self):
        import diffusers

        cls = getattr(diffusers, self.scheduler_config.get("_class_name", "DPMSolverMultistepScheduler"))
        return cls.from_config(self.scheduler_config)

    def sides(self) -> list[int]:
        """Every image side offered (width and height independently)."""
        return list(range(self.min_size, self.max_size + 1, self.size_factor))

    def check_size(self, width: int, height: int, label: str = "size") -> None:
        check_size(width, height, self.min_size, self.max_size, self.size_factor, label)

    def tokens_truncated(self, prompt: str) -> bool:
        return len(self.tokenizer(prompt).input_ids) > self.tokenizer.model_max_length

    def noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Initial latents, one seeded draw per image (the same image whatever it is batched with)."""
        shape = (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Decodes latents into uint8 HWC arrays."""
        images = self.backend.decode(latents / self.scaling_factor).float()
        if not torch.isfinite(images).all():  # black or garbage pixels would otherwise pass as an image
            raise FloatingPointError("the VAE decoder returned NaN/inf (an fp16 overflow?): use an fp32 or bf16 "
                                     "variant, or a VAE with force_upcast in its config")
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return list(images.permute(0, 2, 3, 1).numpy())

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.backend.encode_text(ids)

    def generate(self, requests: list[GenerationRequest],
                 cancelled: Callable[[GenerationRequest], bool] | None = None) -> list[list[np.ndarray]]:
        """Images (uint8 HWC arrays) for each request, in order. Requests with the same step count
        and size run together as one batch. ``cancelled(request)`` is asked before a batch starts and
        at every step: a batch whose requests are all cancelled stops there, and they get no images."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.num_inference_steps, r.height or self.native_size, r.width or self.native_size)
            self.check_size(key[2], key[1])
            groups.setdefault(key, []).append(i)
        out: list[list[np.ndarray]] = [[] for _ in requests]
        for (steps, h, w), idx in groups.items():
            group = [requests[i] for i in idx]
            stop = (lambda: all(cancelled(r) for r in group)) if cancelled else (lambda: False)
            images = self._run(group, steps, h, w, stop)
            if images is None:
                continue
            k = 0
            for i in idx:
                out[i] = images[k:k + requests[i].num_images]
                k += requests[i].num_images
        return out

    @torch.no_grad()
    def _run(self, reqs: list[GenerationRequest], steps: int, height: int, width: int,
             stop: Callable[[], bool] = lambda: False) -> list[np.ndarray] | None:
        """One batch; None when ``stop()`` says so before a step. Only the guided images (scale > 1)
        get an unconditional row, so an unguided image costs one UNet row instead of two."""
        import time

        prompts, negatives, seeds, scales = [], [], [], []
        for r in reqs:
            for j in range(r.num_images):
                prompts.append(r.prompt)
                negatives.append(r.negative_prompt or "")
                seeds.append(r.seed + j)
                scales.append(r.guidance_scale)
        guided = [i for i, s in enumerate(scales) if s > 1.0]
        k = len(guided)
        if stop():
            return None
        # [uncond..., cond...] as diffusers orders them; unguided images have no uncond row
        emb = self.encode([negatives[i] for i in guided] + prompts)
        latents = self.noise(seeds, height, width)
        sched = self.new_scheduler()
        sched.set_timesteps(steps)
        latents = latents * sched.init_noise_sigma
        g = torch.tensor([scales[i] for i in guided], dtype=torch.float32).view(k, 1, 1, 1)
        n_guided = self.guided_steps(len(sched.timesteps))
        deep = None  # the deep features kept by the last whole-UNet step (cache_interval > 1)
        for i, t in enumerate(sched.timesteps):
            if stop():
                return None
            if i == n_guided and k:  # guidance truncated: the conditional rows alone from here on
                emb, guided, k, deep = emb[k:], [], 0, None
            model_in = sched.scale_model_input(torch.cat([latents[guided], latents]), t)
            t0 = time.perf_counter()
            if self.cache_interval > 1:
                whole = self.whole_unet_step(i, len(sched.timesteps))
                noise, deep = self.backend.unet_cached(model_in, t, emb, None if whole else deep)
                noise = noise.float()
            else:
                noise = self.backend.unet(model_in, t, emb).float()
            self.unet_time_s += time.perf_counter() - t0
            self.unet_calls += 1
            uncond, cond = noise[:k], noise[k:]
            if k:
                cond = cond.clone()
                cond[guided] = uncond + g * (cond[guided] - uncond)
            latents = sched.step(cond, t, latents, return_dict=False)[0]
        return self.to_images(latents)


class TorchBackend:
    """Backend over torch modules (eager, quantized or compiled), in ``dtype`` on ``device``."""

    def __init__(self, text_encoder, unet, vae, dtype=torch.float32, device="cpu"):
        self.text_encoder, self.unet_model, self.vae = text_encoder, unet, vae
        self.dtype, self.device = dtype, torch.device(device)
        self.vae_dtype = dtype
        if self.device.type == "cuda":  # fp32 matmuls and convolutions on tensor cores (TF32), as SD pipelines run
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            self.vae, self.vae_dtype = vae.float(), torch.float32  # as diffusers does: fp16 VAE decodes overflow

    def encode_text(self, input_ids):
        return self.text_encoder(input_ids.to(self.device), return_dict=False)[0]

    def unet(self, latents, t, text_emb):
        return self.unet_model(latents.to(self.device, self.dtype), t.to(self.device),
                               text_emb.to(self.device, self.dtype), return_dict=False)[0].cpu()

    def decode(self, latents):
        return self.vae.decode(latents.to(self.device, self.vae_dtype), return_dict=False)[0].cpu()


def generator_from_parts(text_encoder, unet, vae, tokenizer, scheduler_config: dict, dtype=None, device="cpu",
                         info: dict | None = None) -> Generator:
    """A Generator over in-memory torch modules (a model being trained, or loaded by ``load_generator``)."""
    from core.models import size_factor, vae_scale

    backend = TorchBackend(text_encoder, unet, vae, dtype or torch.float32, device)
    scale = vae_scale(vae.config)
    return Generator(backend, tokenizer, scheduler_config, scale, vae.config.latent_channels,
                     vae.config.scaling_factor, unet.config.sample_size * scale, info,
                     size_factor(vae.config, unet.config))


SCHEDULERS = {"dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
              "euler": "EulerDiscreteScheduler"}


def load_generator(model: str, scheduler: str | None = None, device: str = "cpu") -> Generator:
    """A Generator over a diffusers model dir (fp32); ``scheduler`` swaps the sampler (a SCHEDULERS key)."""
    from core.models import load_tokenizer, load_torch_parts, resolve_model, scheduler_config

    path, local = resolve_model(model)
    if not local:  # a hub id: let diffusers download it once, then read the local copy
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    te, unet, vae = load_torch_parts(path, device=device)
    sched = dict(scheduler_config(path))
    if scheduler:
        sched["_class_name"] = SCHEDULERS[scheduler]
    return generator_from_parts(te, unet, vae, load_tokenizer(path), sched, device=device)
