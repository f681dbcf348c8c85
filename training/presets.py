"""Model presets, registered by name (DiT-style), and loading of any SD 1.x/2.x model dir.

A preset builds a real Stable-Diffusion-architecture pipeline from configs with random weights:
CLIP text encoder, a BPE tokenizer trained on the synthetic caption corpus and saved in CLIP
format, UNet2DConditionModel with cross-attention, AutoencoderKL, DDPM training schedule and a
DPM-Solver sampling scheduler. ``load_components`` reads a preset name, a local diffusers folder
or a hub id through one code path.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core.errors import UserError
from core.io import atomic_dir
from core.models import resolve_model, standardize_text_encoder, vae_scale


@dataclass
class Preset:
    """Sizes of one model family. The UNet works on latents of ``resolution / vae_scale``."""

    resolution: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    unet_channels: tuple[int, ...]
    unet_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]
    unet_layers: int
    unet_heads: int  # diffusers calls this attention_head_dim, but it is the number of heads
    vae_channels: tuple[int, ...]
    vae_layers: int = 1
    vae_groups: int = 16
    scheduler: dict = field(default_factory=lambda: dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))


PRESETS: dict[str, Preset] = {
    # ~6.7 M-parameter UNet on 16x16x4 latents (64x64 images, 4x VAE).
    "tiny": Preset(
        resolution=64, vocab_size=1024, text_width=128, text_layers=4, text_heads=4,
        unet_channels=(64, 128, 128),
        unet_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        unet_layers=1, unet_heads=4, vae_channels=(16, 32, 64)),
    # ~72 M-parameter UNet on 32x32x4 latents (128x128 images, 4x VAE): between the tiny model, whose
    # speed is per-operator overhead, and SD 1.5, whose speed is arithmetic (benchmarks/scale_curve.py).
    "mid": Preset(
        resolution=128, vocab_size=1024, text_width=384, text_layers=6, text_heads=6,
        unet_channels=(128, 256, 512),
        unet_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        unet_layers=2, unet_heads=8, vae_channels=(32, 64, 128)),
    # Stable Diffusion 1.5's shapes (860 M-parameter UNet, 123 M text encoder, 8x VAE at 512x512) with
    # random weights: for GPU timing (benchmarks/gpu.py) where the real checkpoint is not at hand.
    # The tokenizer is the small project one, so the text encoder's vocabulary is smaller than CLIP's.
    "sd15-shape": Preset(
        resolution=512, vocab_size=1024, text_width=768, text_layers=12, text_heads=12,
        unet_channels=(320, 640, 1280, 1280),
        unet_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        unet_layers=2, unet_heads=8, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32),
    # For tests: builds and trains in seconds.
    "micro": Preset(
        resolution=32, vocab_size=600, text_width=32, text_layers=1, text_heads=2,
        unet_channels=(32, 32), unet_blocks=("CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D"),
        unet_layers=1, unet_heads=2, vae_channels=(16, 32)),
}


def train_clip_tokenizer(corpus: list[str], vocab_size: int, out_dir: str | Path) -> CLIPTokenizer:
    """Trains a byte-level BPE on ``corpus`` and saves it in CLIP's format (vocab.json + merges.txt).

    The vocabulary is laid out as CLIP's is (Radford et al. 2021): the 256 byte symbols, the same
    with the end-of-word marker ``</w>``, then one entry per merge, then the two special tokens.
    With every byte in the vocabulary, any prompt tokenizes, unknown words as sub-word pieces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    proto = CLIPTokenizer()  # borrow CLIP's normalizer and pre-tokenizer so training matches use
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = proto.backend_tokenizer.normalizer
    tok.pre_tokenizer = proto.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    n_merges = max(0, vocab_size - 2 * len(alphabet) - 2)
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) * 2 + n_merges, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=2)
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges][:n_merges]
    symbols = sorted(alphabet)
    vocab_list = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab_list)
    kept = []
    for a, b in merges:
        if a in seen and b in seen and a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
            kept.append((a, b))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # vocab.json + merges.txt are what every transformers version (4.x slow/fast, 5.x) reads.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def unet_kwargs(p: Preset) -> dict:
    """The UNet2DConditionModel config of a preset."""
    return dict(sample_size=p.resolution // 2 ** (len(p.vae_channels) - 1), in_channels=4, out_channels=4,
                down_block_types=p.unet_blocks, up_block_types=p.unet_up_blocks,
                block_out_channels=p.unet_channels, layers_per_block=p.unet_layers,
                cross_attention_dim=p.text_width, attention_head_dim=p.unet_heads,
                norm_num_groups=min(32, p.unet_channels[0]))


def build_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Writes a randomly initialised pipeline of preset ``name`` as a diffusers model dir."""
    from diffusers import StableDiffusionPipeline

    from synthetic.world import caption_corpus

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    p = PRESETS[name]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_clip_tokenizer(caption_corpus(), p.vocab_size, Path(tmp) / "tokenizer")
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=p.text_width, intermediate_size=p.text_width * 4,
            num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
            max_position_embeddings=77, projection_dim=p.text_width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
            block_out_channels=p.vae_channels, layers_per_block=p.vae_layers,
            norm_num_groups=min(p.vae_groups, p.vae_channels[0]), sample_size=p.resolution)
        unet = UNet2DConditionModel(**unet_kwargs(p))
        scheduler = DPMSolverMultistepScheduler(**p.scheduler, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as staging:  # whole or absent: a killed build is never taken for a model
            pipe.save_pretrained(staging, safe_serialization=True)
            standardize_text_encoder(staging / "text_encoder")
            for name in ("vocab.json", "merges.txt"):  # for transformers 4.x's slow CLIPTokenizer
                shutil.copy(Path(tmp) / "tokenizer" / name, staging / "tokenizer" / name)
    return out_dir


@dataclass
class Components:
    """The parts of an SD pipeline that training touches."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sample_scheduler_config: dict
    source: str

    @property
    def vae_scale(self) -> int:
        return vae_scale(self.vae.config)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale

    def sampler_config(self) -> dict:
        """The config of the sampler the model draws with (DPM-Solver, the noise schedule's prediction type)."""
        return {**self.sample_scheduler_config, "_class_name": "DPMSolverMultistepScheduler",
                "prediction_type": self.noise_scheduler.config.prediction_type}


def load_components(model: str, cache_dir: str | Path | None = None) -> Components:
    """Loads tokenizer, text encoder, VAE, UNet and schedulers from a preset name, dir or hub id."""
    if model in PRESETS:
        target = Path(cache_dir or tempfile.mkdtemp(prefix="t2i-preset-")) / f"preset-{model}"
        if not (target / "model_index.json").exists():
            build_preset(model, target)
        model = str(target)
    path, _ = resolve_model(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
        sched_cfg = DDPMScheduler.load_config(path, subfolder="scheduler")
    except OSError as e:
        raise UserError(f"could not load model {model}: {e}") from None
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    return Components(tokenizer, text_encoder.float(), vae.float(), unet.float(), noise_scheduler,
                      dict(sched_cfg), path)


def swap_vae(comps: Components, vae_dir: str | Path) -> tuple[str, bool]:
    """Puts the AutoencoderKL at ``vae_dir`` in place of ``comps.vae``; when its latent channels differ
    from the UNet's, rebuilds the UNet's conv_in (fresh) and conv_out (zeros: the UNet starts by
    predicting 0) for them. Returns (a line that says what changed, whether they were rebuilt)."""
    path = Path(vae_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"model.vae {vae_dir}: not an AutoencoderKL folder (no config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True).float()
    except (OSError, ValueError) as e:
        raise UserError(f"model.vae {vae_dir}: could not load it ({str(e).splitlines()[0][:200]})") from None
    if vae_scale(vae.config) != vae_scale(comps.vae.config):
        raise UserError(f"model.vae {vae_dir} downsamples {vae_scale(vae.config)}x, the model's VAE "
                        f"{vae_scale(comps.vae.config)}x: the UNet's sample size would change; use a VAE with the same factor")
    unet, c = comps.unet, vae.config.latent_channels
    note = f"VAE replaced by {vae_dir}"
    rebuilt = unet.config.in_channels != c or unet.config.out_channels != c
    if rebuilt:
        old_in, old_out = unet.conv_in, unet.conv_out
        unet.conv_in = torch.nn.Conv2d(c, old_in.out_channels, old_in.kernel_size, padding=old_in.padding)
        unet.conv_out = torch.nn.Conv2d(old_out.in_channels, c, old_out.kernel_size, padding=old_out.padding)
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
        unet.register_to_config(in_channels=c, out_channels=c)
        note += (f"; its latents have {c} channels, so the UNet's conv_in/conv_out were rebuilt for them "
                 "(the UNet must be trained to use the new latent space)")
    comps.vae = vae
    return note, rebuilt
