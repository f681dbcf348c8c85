"""The fine-tuning / pretraining recipe: ``main(cfg)`` = setup -> run -> save.

One accelerate loop covers the three things this project trains: the VAE of a from-scratch
preset (``train.what: vae``), the full UNet (``unet``) and LoRA adapters on the UNet (``lora``),
each optionally with the text encoder. Frozen parts are run once up front and their outputs
cached (kohya / SimpleTuner's main speed lever). Checkpoints are accelerate states written
atomically; ``resume_from: latest`` restores step, optimizer, LR schedule, RNG and data order.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from evaluation.evaluate import EvalConfig
from training.config import Strict, dump_config
from training.errors import UserError

DEFAULT_PROMPTS = ["a red circle on the left", "a blue square in the top right",
                   "a large yellow triangle in the centre on a black background",
                   "a small green cross at the bottom", "a purple star on the right",
                   "a pink heart in the middle, white background"]


class SyntheticData(Strict):
    n: int = 2000
    """Number of images to render when the dataset folder does not exist yet."""
    seed: int = 0
    """Seed of the generator (same seed, same images)."""
    size: int = 64
    """Image side in pixels."""
    exclude: list[str] = []
    """Concepts never drawn (e.g. [star, heart, purple] for a base model)."""
    focus: list[str] = []
    """Concepts each image is steered towards (for a fine-tune that teaches them)."""
    focus_fraction: float = 1.0
    """Share of images that contain a focus concept; the rest replay the whole world."""
    contrast: list[str] = []
    """Known concepts to replay more often: the nearest ones to the focus concepts, which a fine-tune tends
    to draw the new concept for (pink drawn purple, a cross drawn as a star). Their images teach where the
    new concept ends."""
    contrast_fraction: float = 0.0
    """Share of images that contain a contrast concept (taken from the replay; at most 1 - focus_fraction)."""
    max_shapes: int = 1
    """Up to this many shapes per image."""


class DataConfig(Strict):
    path: str = "data/shapes"
    """imagefolder folder (images + metadata.jsonl) or a hub dataset id (online)."""
    image_column: str = "image"
    """Column holding the image."""
    caption_column: str = "text"
    """Column holding the caption."""
    on_bad_image: Literal["skip", "error"] = "skip"
    """What to do with an image that fails to decode: skip it (and count it) or stop."""
    synthetic: SyntheticData | None = None
    """If set, render the synthetic dataset at `path` first (again when it was rendered with other
    settings; a folder not rendered by t2i is used as it is)."""


class ModelConfig(Strict):
    pretrained: str = "models/tiny-base"
    """Preset name (tiny, micro), diffusers model dir, or hub id (SD 1.x/2.x) to start from."""
    resolution: int | None = None
    """Training resolution; default: the model's native size."""


class TrainArgs(Strict):
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_not_false(cls, v):  # YAML 1.1 reads a bare `no` as False
        return "no" if v is False else v

    what: Literal["unet", "lora", "vae"] = "unet"
    """Which weights to train: full UNet, LoRA adapters on the UNet, or the VAE."""
    train_text_encoder: bool = False
    """Also train the text encoder (fully)."""
    text_encoder_learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate of the text encoder (null: train.learning_rate). A fine-tune that teaches
    new words may need it higher: their embeddings start where the base left unseen tokens."""
    focus_token_learning_rate: float | None = Field(None, gt=0)
    """Textual-inversion style: a learning rate of their own (no weight decay) for the input embeddings of
    the focus words' tokens, which start untrained when the base never saw the words; every other token
    embedding is then frozen. Needs the focus words. With train.train_text_encoder false the rest of the
    text encoder stays frozen, so the known words' text states do not move at all."""
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to run."""
    batch_size: int = Field(16, ge=1)
    """Images per process per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    """Shape of the learning rate after warm-up."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warm-up steps."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """AdamW, or bitsandbytes' 8-bit AdamW where it runs."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision (fp16 needs a GPU)."""
    ema_decay: float | None = None
    """If set, keep an EMA of the trained weights with this decay and save it (and sample from it)."""
    ema_warmup: bool = True
    """With ema_decay: diffusers' warm-up, where the decay at step s is min(ema_decay, (1 + s) / (10 + s)), so the
    starting weights fade fast; a decay of 0.995 is then only reached after 1,790 steps (0.987 at step 700).
    false applies ema_decay from the first step (at 0.995 the starting weights still count 3% after 700 steps)."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is the paper's choice); null disables."""
    snr_weighting: Literal["min_snr", "min_snr_plus_one"] = "min_snr"
    """With snr_gamma: min_snr weights the x0 loss by min(SNR, gamma), which for v-prediction gives the
    noisiest timesteps almost no weight; min_snr_plus_one uses min(SNR + 1, gamma), keeping full
    weight there (needs v-prediction)."""
    focus_snr_weighting: Literal["min_snr", "min_snr_plus_one"] | None = None
    """With snr_gamma: the weighting of the images that teach something new (captions holding a
    train.focus_words word), e.g. min_snr_plus_one there while the replayed images keep min_snr."""
    focus_words: list[str] | None = None
    """Words that mark a caption as teaching something new (default: data.synthetic.focus)."""
    preserve_weight: float = Field(0.0, ge=0)
    """Weight of a distillation loss on the replayed images (captions without a focus word): the
    trained model's prediction is pulled towards a frozen copy of the starting model's on the same
    noisy latents, at every timestep with equal weight (Learning without Forgetting, Li & Hoiem
    2016). It anchors what the base knew where the ground truth gives a weak, noisy signal (the
    noisy end); costs one extra UNet forward on those images. 0 disables."""
    foreground_weight: float = Field(1.0, gt=0)
    """Loss weight of an image's object against its background's 1.0, for images on a flat
    background (icons, products, the synthetic world): the background colour is read off the image
    border, a pixel more than 24/255 away from it in any channel is foreground, and a latent cell is
    foreground if any of its pixels is. Puts the gradient where shapes differ in small details
    (a star against a cross) instead of on the easy background. 1.0 disables."""
    noise_offset: float = 0.0
    """Noise offset (helps flat, very dark or bright images)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the model's prediction type (null keeps the scheduler's)."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero terminal SNR and sample with trailing timesteps (Lin et al.
    2023); needs v_prediction. With the usual schedule the last step still shows 7% of the image,
    so a model learns to take the layout from the seed's noise instead of from the prompt."""
    timestep_bias: Literal["none", "later", "earlier"] = "none"
    """Draw more training timesteps from the noisy end (later: composition and layout) or the clean
    end (earlier: fine detail), as diffusers' SDXL script does."""
    timestep_bias_portion: float = Field(0.25, gt=0, le=1)
    """Fraction of the timesteps (at the biased end) that are drawn more often."""
    timestep_bias_multiplier: float = Field(1.0, ge=1)
    """How much more often those timesteps are drawn (1.0 = no bias)."""
    caption_dropout: float = Field(0.1, ge=0, le=1)
    """Share of captions replaced by "" (classifier-free guidance needs it)."""
    cache: bool = True
    """Cache latents / text embeddings of frozen VAE / text encoder."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the UNet."""
    vae_kl_weight: float = 1e-6
    """KL weight of the VAE stage."""
    save_dtype: Literal["fp32", "fp16"] = "fp32"
    """Precision of the saved model dir."""
    seed: int = 0
    """Seed of init noise, data order and dropout."""


class LoraArgs(Strict):
    rank: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(8, ge=1)
    """LoRA alpha (scale = alpha / rank)."""
    target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    """UNet module names that get adapters."""


class LoggingArgs(Strict):
    log_every: int = Field(10, ge=1)
    """Steps between TensorBoard scalars."""
    sample_every: int = Field(500, ge=0)
    """Steps between sample grids (0: only at the end)."""
    validation_prompts: list[str] = DEFAULT_PROMPTS
    """Fixed prompts of the sample grid."""
    sample_steps: int = 20
    """Sampling steps of the grid."""
    sample_guidance: float = 5.0
    """Guidance scale of the grid."""


class CheckpointArgs(Strict):
    every: int = Field(500, ge=1)
    """Steps between checkpoints."""
    total_limit: int | None = 2
    """Keep at most this many checkpoints (oldest deleted)."""
    resume_from: str | None = None
    """'latest', a checkpoint folder, or null to start fresh."""


class TrainConfig(Strict):
    output_dir: str = "runs/train"
    """Run folder: config, logs, checkpoints, model/ and train_report.json."""
    model: ModelConfig = ModelConfig()
    """Where to start from."""
    data: DataConfig = DataConfig()
    """Training images and captions."""
    train: TrainArgs = TrainArgs()
    """Optimisation."""
    lora: LoraArgs = LoraArgs()
    """LoRA settings (train.what=lora)."""
    logging: LoggingArgs = LoggingArgs()
    """TensorBoard logging and sample grids."""
    checkpoint: CheckpointArgs = CheckpointArgs()
    """Checkpointing and resume."""
    eval: EvalConfig | None = None
    """Evaluate against the starting model after training (t2i eval --compare); null skips it."""


class TrainingDiverged(UserError):
    pass


# ============================================================================ setup

def prepare_data(cfg: TrainConfig, resolution: int):
    from training.data import WorldSpec, generate_dataset, load_imagefolder, synthetic_spec_matches

    d = cfg.data
    if d.synthetic is not None:
        s = d.synthetic
        spec = WorldSpec(tuple(s.exclude), tuple(s.focus), s.focus_fraction, s.max_shapes, tuple(s.contrast),
                         s.contrast_fraction)
        if not Path(d.path).exists():
            generate_dataset(d.path, s.n, s.seed, s.size, spec)
        elif synthetic_spec_matches(d.path, s.n, s.seed, s.size, spec) is False:
            # our own rendering, of other settings: a stale dataset would silently train the old recipe
            print(f"{d.path} was rendered with other data.synthetic settings; rendering it again")
            generate_dataset(d.path, s.n, s.seed, s.size, spec, overwrite=True)
    return load_imagefolder(d.path, resolution, d.image_column, d.caption_column, d.on_bad_image)


def _check_resolution(comps, res: int) -> None:
    # UNet downsampling in latent space, and diffusers' pipeline wants pixel sizes divisible by 8
    factor = math.lcm(8, comps.vae_scale * 2 ** (len(comps.unet.config.block_out_channels) - 1))
    if res % factor or res < factor:
        raise UserError(f"resolution {res} is not supported by this model: it must be a positive "
                        f"multiple of {factor} (VAE x UNet downsampling)")


def _find_checkpoint(ckpt_dir: Path, resume_from: str | None) -> Path | None:
    if not resume_from:
        return None
    if resume_from != "latest":
        p = Path(resume_from)
        if not (p / "train_state.json").exists():
            raise UserError(f"checkpoint {resume_from} does not exist or is incomplete")
        return p
    done = sorted(p for p in ckpt_dir.glob("checkpoint-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def _param_groups(cfg: TrainConfig, trainable: list[torch.nn.Module], text_encoder: torch.nn.Module,
                  focus_token_ids: list[int] = ()) -> list[dict]:
    """One optimizer group per trained module; the text encoder may have its own LR, and the focus words'
    token embeddings a group of their own (train.focus_token_learning_rate)."""
    t = cfg.train
    tokens = text_encoder.get_input_embeddings().weight if t.focus_token_learning_rate else None
    groups = [{"params": [p for p in m.parameters() if p.requires_grad and p is not tokens],
               "lr": (t.text_encoder_learning_rate or t.learning_rate) if m is text_encoder else t.learning_rate}
              for m in trainable]
    groups = [g for g in groups if g["params"]]
    if tokens is not None:
        rows = torch.zeros(tokens.shape[0], 1, dtype=tokens.dtype, device=tokens.device)
        rows[list(focus_token_ids)] = 1.0
        tokens.register_hook(lambda g: g * rows)  # the other rows get no gradient, hence no AdamW step
        groups.append({"params": [tokens], "lr": t.focus_token_learning_rate, "weight_decay": 0.0})
    return groups


def _focus_token_ids(run: "Run") -> list[int]:
    """The tokenizer's ids of the focus words (each may be several BPE pieces), without special tokens."""
    tok = run.model.tokenizer
    special = set(tok.all_special_ids)
    return sorted({i for w in run.focus_words for i in tok(w).input_ids if i not in special})


def _optimizer(cfg: TrainConfig, groups: list[dict]):
    t = cfg.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        except Exception as e:  # no kernel for this device
            raise UserError(f"8-bit AdamW is not available here ({e}); use train.optimizer=adamw") from None
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


@dataclass
class Teacher:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None


def _frozen_copy(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, device) -> Teacher:
    """A frozen copy of the starting model, the target of train.preserve_weight."""
    import copy

    def freeze(m):
        return copy.deepcopy(m).to(device).eval().requires_grad_(False)
    return Teacher(freeze(unet), freeze(text_encoder) if text_encoder is not None else None)


class Run:
    """State of one training run (setup builds it, run_loop advances it, save writes it)."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from training.model import LatentDiffusion
        from training.presets import load_components

        self.cfg = cfg
        t = cfg.train
        self.out = Path(cfg.output_dir)
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        # Everything that can fail on bad input happens before the run folder is touched.
        comps = load_components(cfg.model.pretrained, cache_dir=Path(cfg.output_dir).parent / ".presets")
        self.resolution = cfg.model.resolution or comps.resolution
        _check_resolution(comps, self.resolution)
        self.data = prepare_data(cfg, self.resolution)
        self.ckpt_dir = self.out / "checkpoints"
        self.resume = _find_checkpoint(self.ckpt_dir, cfg.checkpoint.resume_from)

        # cpu=True without a GPU: how accelerate picks gloo data parallelism (MULTI_CPU) when
        # `accelerate launch --multi_gpu` / torchrun start several processes on a CPU machine.
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with="tensorboard", project_config=ProjectConfiguration(
                project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        torch.manual_seed(t.seed + self.acc.process_index)
        v_prediction = (t.prediction_type or comps.noise_scheduler.config.prediction_type) == "v_prediction"
        if t.zero_terminal_snr and not v_prediction:
            raise UserError("train.zero_terminal_snr needs train.prediction_type=v_prediction (epsilon is "
                            "undefined at zero SNR)")
        if "min_snr_plus_one" in (t.snr_weighting, t.focus_snr_weighting) and not v_prediction:
            raise UserError("min_snr_plus_one weighting needs v-prediction (set train.prediction_type="
                            "v_prediction, or use min_snr)")
        self.focus_words = {w.lower() for w in t.focus_words or (cfg.data.synthetic.focus if cfg.data.synthetic else [])}
        if t.focus_token_learning_rate and t.what == "vae":
            raise UserError("train.focus_token_learning_rate trains the text encoder's embeddings: "
                            "it needs train.what=unet or lora")
        trains_text = t.train_text_encoder or bool(t.focus_token_learning_rate)
        for key in ("focus_snr_weighting", "preserve_weight", "focus_token_learning_rate"):
            if getattr(t, key) and not self.focus_words:
                raise UserError(f"train.{key} needs the focus words: set train.focus_words "
                                "(or data.synthetic.focus)")
        if t.preserve_weight and t.what not in ("unet", "lora"):
            raise UserError("train.preserve_weight distils the UNet: it needs train.what=unet or lora")
        start = comps.noise_scheduler.config
        if t.preserve_weight and ((t.prediction_type or start.prediction_type) != start.prediction_type or
                                  (t.zero_terminal_snr and not start.get("rescale_betas_zero_snr", False))):
            raise UserError("train.preserve_weight distils the starting model, which predicts "
                            f"{start.prediction_type} on its own noise schedule: change train.prediction_type / "
                            "train.zero_terminal_snr in a stage of its own first, then preserve from that model")
        for m in (comps.vae, comps.text_encoder, comps.unet):  # frozen parts too; prepare() moves only trained ones
            m.to(self.acc.device)
        self.model = LatentDiffusion(comps, t.prediction_type, t.snr_gamma, t.noise_offset, t.zero_terminal_snr,
                                     (t.timestep_bias, t.timestep_bias_portion, t.timestep_bias_multiplier),
                                     t.snr_weighting)
        # the teacher is the model as it starts (copied before any LoRA adapter is added)
        self.teacher = _frozen_copy(comps.unet, comps.text_encoder if trains_text else None,
                                    self.acc.device) if t.preserve_weight else None
        self.trainable = self._select_trainable(comps)
        self.cache_latents = t.cache and t.what != "vae"
        self.cache_text = t.cache and t.what != "vae" and not trains_text
        self.steps_per_epoch = max(1, len(self.data.captions) // (t.batch_size * self.acc.num_processes))
        self.global_step = 0
        self.ema = None
        self.ema_params: list[torch.nn.Parameter] = []  # the order the EMA keeps its copies in

    # ---------------------------------------------------------------- which weights
    def _select_trainable(self, comps) -> list[torch.nn.Module]:
        t = self.cfg.train
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.requires_grad_(False)
        if t.what == "vae":
            comps.vae.requires_grad_(True)
            return [comps.vae]
        mods = []
        if t.what == "lora":
            from peft import LoraConfig
            comps.unet.add_adapter(LoraConfig(r=self.cfg.lora.rank, lora_alpha=self.cfg.lora.alpha,
                                              init_lora_weights="gaussian",
                                              target_modules=self.cfg.lora.target_modules))
        else:
            comps.unet.requires_grad_(True)
        if t.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        mods.append(comps.unet)
        if t.train_text_encoder:
            comps.text_encoder.requires_grad_(True)
            mods.append(comps.text_encoder)
        elif t.focus_token_learning_rate:  # the token embeddings alone (only the focus words' rows move)
            comps.text_encoder.get_input_embeddings().weight.requires_grad_(True)
            mods.append(comps.text_encoder)
        return mods

    # ---------------------------------------------------------------- caching
    @torch.no_grad()
    def build_caches(self) -> None:
        from training.model import to_pixels

        pixels = torch.from_numpy(self.data.pixels)
        self.pixels = pixels
        self.fg_weights = None
        if self.cfg.train.foreground_weight != 1.0 and self.cfg.train.what != "vae":
            from training.model import foreground_mask

            latent_hw = self.resolution // self.model.c.vae_scale
            mask = torch.cat([foreground_mask(pixels[i:i + 256], latent_hw) for i in range(0, len(pixels), 256)])
            self.fg_weights = 1.0 + (self.cfg.train.foreground_weight - 1.0) * mask
        if self.cache_latents:
            means, stds = [], []
            for i in tqdm(range(0, len(pixels), 64), desc="caching latents", leave=False,
                          disable=not self.acc.is_local_main_process):
                m, s = self.model.encode_images(to_pixels(pixels[i:i + 64]).to(self.acc.device))
                means.append(m)
                stds.append(s)
            self.lat_mean, self.lat_std = torch.cat(means), torch.cat(stds)
        if self.cache_text:
            uniq = sorted(set(self.data.captions) | {""})
            self.caption_index = {c: i for i, c in enumerate(uniq)}
            embs = []
            for i in tqdm(range(0, len(uniq), 256), desc="caching text", leave=False,
                          disable=not self.acc.is_local_main_process):
                embs.append(self.model.encode_text(uniq[i:i + 256]))
            self.text_cache = torch.cat(embs)

    # ---------------------------------------------------------------- data order
    def batch_indices(self, micro_step: int) -> np.ndarray:
        """Indices of this process's micro-batch; a pure function of the step (exact resume)."""
        t = self.cfg.train
        epoch, k = divmod(micro_step, self.steps_per_epoch)
        perm = np.random.default_rng(t.seed + epoch).permutation(len(self.data.captions))
        per = t.batch_size * self.acc.num_processes
        glob = perm[k * per:(k + 1) * per]
        return glob[self.acc.process_index::self.acc.num_processes]

    def focus_mask(self, idx: np.ndarray) -> torch.Tensor | None:
        """Which images of the micro-batch teach something new (their caption holds a focus word)."""
        if not self.cfg.train.focus_snr_weighting and self.teacher is None:
            return None
        return torch.tensor([bool(self.focus_words & set(re.findall(r"[a-z0-9]+", self.data.captions[i].lower())))
                             for i in idx])

    def batch(self, idx: np.ndarray):
        from training.model import to_pixels

        t = self.cfg.train
        captions = [self.data.captions[i] for i in idx]
        drop = torch.rand(len(captions)) < t.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        if t.what == "vae":
            return to_pixels(self.pixels[idx]).to(self.acc.device), None
        if self.cache_latents:
            latents = self.model.sample_latents(self.lat_mean[idx], self.lat_std[idx])
        else:
            with torch.no_grad():
                m, s = self.model.encode_images(to_pixels(self.pixels[idx]).to(self.acc.device))
            latents = self.model.sample_latents(m, s)
        if self.cache_text:
            emb = self.text_cache[[self.caption_index[c] for c in captions]]
        else:
            emb = self.model.encode_text(captions)
        self.last_captions = captions
        return latents, emb

    def teacher_text(self, emb: torch.Tensor) -> torch.Tensor:
        """The teacher's text embeddings of the last micro-batch (the student's if the text encoder is frozen)."""
        if self.teacher.text_encoder is None:
            return emb.detach()
        with torch.no_grad():
            ids = self.model.tokenize(self.last_captions).to(emb.device)
            return self.teacher.text_encoder(ids, return_dict=False)[0]


# ============================================================================ run

def setup(cfg: TrainConfig) -> Run:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    run = Run(cfg)
    acc, t = run.acc, cfg.train
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run.out / "config.yaml")
    run.build_caches()
    groups = _param_groups(cfg, run.trainable, run.model.text_encoder,
                           _focus_token_ids(run) if t.focus_token_learning_rate else ())
    params = [p for g in groups for p in g["params"]]
    run.optimizer = _optimizer(cfg, groups)
    run.lr_scheduler = get_scheduler(t.lr_scheduler, run.optimizer, num_warmup_steps=t.warmup_steps * acc.num_processes,
                                     num_training_steps=t.max_steps * acc.num_processes)
    prepared = acc.prepare(*run.trainable, run.optimizer, run.lr_scheduler)
    *mods, run.optimizer, run.lr_scheduler = prepared
    names = ["vae"] if t.what == "vae" else ["unet", "text_encoder"][:len(mods)]
    for name, m in zip(names, mods):
        setattr(run.model, name, m)
    if t.ema_decay:
        # min_decay = decay turns diffusers' (1 + s) / (10 + s) warm-up off
        run.ema_params = params
        run.ema = EMAModel(params, decay=t.ema_decay, min_decay=0.0 if t.ema_warmup else t.ema_decay)
        acc.register_for_checkpointing(run.ema)
        reached = run.ema.get_decay(t.max_steps)  # diffusers' own schedule, at the last step
        if t.ema_warmup and reached < t.ema_decay:
            acc.print(f"note: with train.ema_warmup the EMA decay reaches only {reached:.4f} by step {t.max_steps}, "
                      f"not train.ema_decay={t.ema_decay}; set train.ema_warmup=false to use {t.ema_decay} throughout")
    if run.resume is not None:
        try:
            acc.load_state(str(run.resume))
            run.global_step = json.loads((run.resume / "train_state.json").read_text())["global_step"]
        except Exception as e:
            raise UserError(f"checkpoint {run.resume} is corrupt or does not match this config ({e}); "
                            "delete it to resume from an earlier one") from None
        acc.print(f"resumed from {run.resume} at step {run.global_step}")
    if acc.is_main_process:
        acc.init_trackers("t2i", config=_flat_hparams(cfg))
    return run


def _flat_hparams(cfg: TrainConfig) -> dict:
    out = {}
    for sec, vals in cfg.model_dump().items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                if isinstance(v, (int, float, str, bool)):
                    out[f"{sec}.{k}"] = v
    return out


def train_step(run: Run, micro: int):
    """One micro-batch: forward, backward, and (at accumulation boundaries) clip + optimizer step.

    Returns (loss, images processed by all processes, grad norm or None).
    """
    acc, t = run.acc, run.cfg.train
    with acc.accumulate(*run.trainable):
        idx = run.batch_indices(micro)
        inputs, emb = run.batch(idx)
        with acc.autocast():  # also covers vae.encode/decode, which are not forward()
            if t.what == "vae":
                loss = run.model.vae_loss(inputs, t.vae_kl_weight)
            else:
                focus = run.focus_mask(idx)
                preserve = None if run.teacher is None else \
                    (run.teacher.unet, run.teacher_text(emb), ~focus, t.preserve_weight)
                weights = None if run.fg_weights is None else run.fg_weights[idx].to(inputs.device)
                loss = run.model.loss(inputs, emb, focus, t.focus_snr_weighting, preserve, weights)
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients and t.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                            t.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, len(inputs) * acc.num_processes, grad_norm


def run_loop(run: Run) -> dict:
    acc, t = run.acc, run.cfg.train
    for m in run.trainable:
        m.train()
    start_step = run.global_step
    bar = tqdm(total=t.max_steps, initial=start_step, desc="training", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    t0, last_loss, images_seen = time.time(), float("nan"), 0
    micro = run.global_step * t.grad_accum
    while run.global_step < t.max_steps:
        loss, n_images, grad_norm = train_step(run, micro)
        micro += 1
        images_seen += n_images
        if not acc.sync_gradients:
            continue
        loss_val = acc.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(loss_val):
            last = _find_checkpoint(run.ckpt_dir, "latest")
            raise TrainingDiverged(f"loss became {loss_val} at step {run.global_step + 1}; training stopped. "
                                   f"Last good checkpoint: {last or 'none'}. Lower train.learning_rate or use "
                                   "train.mixed_precision=no.")
        if run.ema is not None:
            run.ema.step(run.ema_params)
        run.global_step += 1
        last_loss = loss_val
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}")
        if run.global_step % run.cfg.logging.log_every == 0:
            logs = {"loss": loss_val, "lr": run.lr_scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            acc.log(logs, step=run.global_step)
        if run.global_step % run.cfg.checkpoint.every == 0 or run.global_step == t.max_steps:
            save_checkpoint(run)
        se = run.cfg.logging.sample_every
        if (se and run.global_step % se == 0) or run.global_step == t.max_steps:
            log_samples(run)
    bar.close()
    wall = time.time() - t0
    return {"steps": run.global_step, "steps_this_run": run.global_step - start_step, "wall_time_s": round(wall, 2),
            "images_per_s": round(images_seen / wall, 2) if wall > 0 else None, "final_loss": last_loss,
            "num_processes": acc.num_processes, "num_images": len(run.data.captions),
            "ema_decay_last": None if run.ema is None or run.ema.cur_decay_value is None else round(run.ema.cur_decay_value, 6),
            "skipped_images": run.data.skipped,
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def save_checkpoint(run: Run) -> Path:
    """accelerate state under a .tmp name, renamed when complete; then prune old ones."""
    acc = run.acc
    final = run.ckpt_dir / f"checkpoint-{run.global_step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "train_state.json").write_text(json.dumps({"global_step": run.global_step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        limit = run.cfg.checkpoint.total_limit
        done = sorted(p for p in run.ckpt_dir.glob("checkpoint-*") if not p.name.endswith(".tmp"))
        if limit:
            for old in done[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _with_ema(run: Run):
    """Context: swap EMA weights in (for sampling / saving) and back out."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        if run.ema is None:
            yield
            return
        params = run.ema_params
        run.ema.store(params)
        run.ema.copy_to(params)
        try:
            yield
        finally:
            run.ema.restore(params)
    return ctx()


def log_samples(run: Run) -> None:
    from training.model import image_grid, to_pixels, unwrap

    acc = run.acc
    if acc.is_main_process:
        lg = run.cfg.logging
        with _with_ema(run):
            for m in run.trainable:
                m.eval()
            if run.cfg.train.what == "vae":
                with torch.no_grad():
                    x = to_pixels(run.pixels[:8])
                    rec = unwrap(run.model.vae)(x).sample
                imgs = [_to_pil(im) for im in torch.cat([x, rec])]
                grid = image_grid(imgs, cols=min(8, len(x)))
            else:
                imgs = run.model.sample(lg.validation_prompts, lg.sample_steps, lg.sample_guidance, seed=0,
                                        resolution=run.resolution)
                grid = image_grid(imgs, cols=min(len(imgs), 6))
            for m in run.trainable:
                m.train()
        (run.out / "samples").mkdir(exist_ok=True)
        grid.save(run.out / "samples" / f"step-{run.global_step:07d}.png")
        tb = acc.get_tracker("tensorboard")
        tb.writer.add_image("samples", np.asarray(grid), run.global_step, dataformats="HWC")
        tb.writer.flush()
    acc.wait_for_everyone()


def _to_pil(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


# ============================================================================ save

def save(run: Run, report: dict) -> Path:
    """Writes model/ (a diffusers dir; LoRA fused, adapter also in lora/) and train_report.json."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from training.model import unwrap

    acc, cfg = run.acc, run.cfg
    acc.wait_for_everyone()
    if acc.is_main_process:
        unet = unwrap(run.model.unet)
        with _with_ema(run):
            if cfg.train.what == "vae":
                _set_latent_scale(run)
            if cfg.train.what == "lora":
                from diffusers.utils import convert_state_dict_to_diffusers

                lora_tmp = run.out / "lora.tmp"
                shutil.rmtree(lora_tmp, ignore_errors=True)
                StableDiffusionPipeline.save_lora_weights(
                    lora_tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                    safe_serialization=True)
                _replace(lora_tmp, run.out / "lora")
                unet.fuse_lora()
                unet.unload_lora()
            pipe = run.model.pipeline()
            if cfg.train.save_dtype == "fp16":
                pipe.to(torch.float16)
            tmp = run.out / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            pipe.save_pretrained(tmp, safe_serialization=True)
            src_tok = Path(run.model.c.source) / "tokenizer"
            for name in ("vocab.json", "merges.txt"):
                if (src_tok / name).exists() and not (tmp / "tokenizer" / name).exists():
                    shutil.copy(src_tok / name, tmp / "tokenizer" / name)
            dump_config(cfg, tmp / "t2i_train.yaml")
            _replace(tmp, run.out / "model")
        report = {**report, "model_dir": str(run.out / "model"), "what": cfg.train.what}
        _write_json(run.out / "train_report.json", report)
    acc.end_training()
    return run.out / "model"


@torch.no_grad()
def _set_latent_scale(run: Run) -> None:
    """SD's scaling_factor: 1 / std of the latents, so the UNet sees unit-variance inputs."""
    from training.model import to_pixels, unwrap

    vae = unwrap(run.model.vae).eval()
    x = to_pixels(run.pixels[:256])
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample() for i in range(0, len(x), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def main(cfg: TrainConfig) -> dict:
    """Runs a whole training job; returns the train report."""
    run = setup(cfg)
    report = run_loop(run)
    save(run, report)
    if cfg.eval is not None and run.acc.is_main_process:
        report["eval"] = evaluate_after_training(cfg)
        _write_json(run.out / "train_report.json", {**json.loads((run.out / "train_report.json").read_text()),
                                                     "eval": report["eval"]})
    return report


def evaluate_after_training(cfg: TrainConfig) -> dict:
    """Compares the trained model with the one it started from (known vs newly taught concepts)."""
    from evaluation.evaluate import compare, evaluate, format_table
    from training.presets import PRESETS

    ecfg = cfg.eval
    if not ecfg.new_concepts and cfg.data.synthetic is not None:
        ecfg = ecfg.model_copy(update={"new_concepts": list(cfg.data.synthetic.focus)})
    model, out = str(Path(cfg.output_dir) / "model"), str(Path(cfg.output_dir) / "eval")
    if cfg.model.pretrained in PRESETS:  # nothing meaningful to compare a random init with
        report = evaluate(model, out, ecfg)
        print(format_table(report))
        return {"splits": report["splits"], "features": report["features"]}
    report = compare(model, cfg.model.pretrained, out, ecfg)
    print(format_table(report))
    return {"summary": report["summary"], "features": report["features"]}
