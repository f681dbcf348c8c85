"""The training config: one typed model per section, field docstrings as the documentation.

Torch-free on purpose: ``t2i train --help`` builds its flags from these models without importing
the training stack. Cross-field checks that need no model are validators here; checks that need the
model (its prediction type, its resolution) run when the run is built (``training.run``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.config import Strict
from synthetic.config import WorldConfig

DEFAULT_PROMPTS = ["a red circle on the left", "a blue square in the top right",
                   "a large yellow triangle in the centre on a black background",
                   "a small green cross at the bottom", "a purple star on the right",
                   "a pink heart in the middle, white background"]


class DataConfig(Strict):
    path: str = "data/shapes"
    """Dataset folder: images (any size, mode, orientation) with captions in metadata.jsonl, metadata.csv
    or side-car .txt/.caption files; or a hub dataset id (online)."""
    image_column: str = "image"
    """Column holding the image."""
    caption_column: str = "text"
    """Column holding the caption."""
    on_bad_image: Literal["skip", "error"] = "skip"
    """What to do with an image that fails to decode: skip it (and count it) or stop."""
    crop: Literal["center", "random"] = "center"
    """How a non-square image becomes square: its centre, or a random window along the long side
    (drawn once per image from train.seed)."""
    flip: bool = False
    """Random horizontal flips (each image is seen in both orientations)."""
    on_poor_fit: Literal["warn", "error"] = "warn"
    """What to do when the model's VAE cannot represent the images (round-trip PSNR below
    data.min_vae_psnr): warn with the remedy, or stop before training."""
    min_vae_psnr: float = 20.0
    """Round-trip PSNR (dB) of the VAE on a sample of the dataset under which it counts as a poor fit."""
    synthetic: WorldConfig | None = None
    """If set, render the synthetic dataset at `path` first (again when it was rendered with other
    settings; a folder not rendered by t2i is used as it is)."""


class ModelConfig(Strict):
    pretrained: str = "models/tiny-base"
    """Preset name (tiny, micro), diffusers model dir, or hub id (SD 1.x/2.x) to start from."""
    resolution: int | None = None
    """Training resolution; default: the model's native size."""
    vae: str | None = None
    """An AutoencoderKL folder that replaces the model's VAE (e.g. one made by ``t2i train-autoencoder``).
    When its latent channels differ from the UNet's, the UNet's first and last convolutions are
    rebuilt for them (the rest keeps its weights) and the UNet has to be re-adapted: train it."""


class TrainArgs(Strict):
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_not_false(cls, v):  # YAML 1.1 reads a bare `no` as False
        return "no" if v is False else v

    @model_validator(mode="after")
    def _consistent(self):
        if self.focus_token_learning_rate and self.what == "vae":
            raise ValueError("train.focus_token_learning_rate trains the text encoder's embeddings: "
                             "it needs train.what=unet or lora")
        return self

    what: Literal["unet", "lora", "vae"] = "unet"
    """Which weights to train: full UNet, LoRA adapters on the UNet, or the VAE."""
    train_text_encoder: bool = False
    """Also train the text encoder (fully)."""
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
    """With ema_decay: diffusers' warm-up, where the decay at step s is min(ema_decay, (1 + s) / (10 + s)), so
    the starting weights fade fast (0.995 is reached only after 1,790 steps); false applies ema_decay from
    the first step."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is the paper's choice); null disables."""
    focus_words: list[str] | None = None
    """The new words a fine-tune teaches, whose token embeddings train.focus_token_learning_rate trains
    (null: data.synthetic.focus; the run prints which words it uses)."""
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
    cache_batch_size: int | None = Field(None, ge=1)
    """Images per VAE encode while caching latents (default: 16 on the CPU, 8 on a GPU, where a 64-image
    encode at 512 px would peak above training's memory)."""
    cache_fill: Literal["lazy", "upfront"] = "lazy"
    """lazy: the caches fill as the first epoch's batches need them, so training starts at once;
    upfront: everything is encoded before step 1 (and on a GPU the report separates caching's memory
    peak, cache_peak_gpu_mem_gb, from training's). Same cached values either way."""
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


class PriorArgs(Strict):
    """DreamBooth's prior preservation (Ruiz et al. 2023): images the model draws of the subject's class
    before training are trained on beside the user's images, so the class word keeps its meaning
    while a rare token learns the subject."""

    class_prompt: str | list[str] | None = None
    """The subject's class without the rare token (e.g. "a photo of a cat"), or a list of such prompts:
    class image i is drawn from prompt i mod its length, so the class images cover what the list names
    (the class in several colours, say: [a red triangle, a blue triangle]); null turns prior
    preservation off."""
    num_images: int = Field(100, ge=1)
    """Class images the model draws before training (seeds 0..num_images-1)."""
    weight: float = Field(1.0, ge=0)
    """Weight of the class images' loss next to the user's images' (DreamBooth's lambda); the logged loss
    is their sum, so it reads about twice a run without the prior."""
    dir: str | None = None
    """Where the class images are written (default: OUTPUT_DIR/class_images); a folder drawn with the
    same model, prompt and settings is reused."""
    steps: int = Field(25, ge=1)
    """Sampling steps of the class images."""
    guidance: float = 5.0
    """Guidance scale of the class images."""

    @field_validator("class_prompt", mode="before")
    @classmethod
    def _prompts_given(cls, v):
        if v is None:
            return v
        if not (isinstance(v, str) or isinstance(v, list | tuple) and all(isinstance(p, str) for p in v)):
            raise ValueError(f"expected a prompt or a list of prompts, got {v!r}")
        if not isinstance(v, str) and not v:
            raise ValueError("an empty list draws nothing: give at least one prompt, or null for no prior")
        if any(not p.strip() for p in ([v] if isinstance(v, str) else v)):
            raise ValueError("a class prompt is blank")
        return v

    @model_validator(mode="after")
    def _every_prompt_drawn(self):
        if len(self.prompts()) > self.num_images:
            raise ValueError(f"{len(self.prompts())} class prompts but prior.num_images={self.num_images}: the "
                             "prompts past num_images would never be drawn")
        return self

    def prompts(self) -> list[str]:
        """The class prompts as a list (empty when prior preservation is off)."""
        if self.class_prompt is None:
            return []
        return [self.class_prompt] if isinstance(self.class_prompt, str) else list(self.class_prompt)


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
    final_samples: bool = True
    """Draw a sample grid at the last step (in addition to every sample_every steps)."""


class CheckpointArgs(Strict):
    every: int = Field(500, ge=1)
    """Steps between checkpoints."""
    total_limit: int | None = 2
    """Keep at most this many checkpoints (oldest deleted)."""
    resume_from: str | None = None
    """'latest', a checkpoint folder, or null to start fresh."""
    save_final: bool = True
    """Write a checkpoint at the last step too (model/ is always written)."""


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
    prior: PriorArgs = PriorArgs()
    """Prior preservation with class images the model draws first (DreamBooth); off by default."""
    logging: LoggingArgs = LoggingArgs()
    """TensorBoard logging and sample grids."""
    checkpoint: CheckpointArgs = CheckpointArgs()
    """Checkpointing and resume."""

    def focus_words_resolved(self) -> list[str]:
        """train.focus_words, else data.synthetic.focus (lower-cased)."""
        words = self.train.focus_words
        if words is None:
            words = self.data.synthetic.focus if self.data.synthetic else []
        return [w.lower() for w in words]

    def check_paths(self) -> None:
        """The model dir and dataset folder as typed, checked before the training stack is imported (which
        takes seconds): a typo is a clear error at once. Preset names and hub ids are the loader's."""
        from pathlib import Path

        from core.datasets import dataset_exists, dataset_rows
        from core.models import resolve_model

        if "/" in self.model.pretrained or Path(self.model.pretrained).exists():
            resolve_model(self.model.pretrained)
        if self.data.synthetic is None and dataset_exists(self.data.path):
            dataset_rows(self.data.path, self.data.image_column, self.data.caption_column)  # empty, uncaptioned

    @model_validator(mode="after")
    def _focus_words_known(self):
        if self.train.focus_token_learning_rate and not self.focus_words_resolved():
            raise ValueError("train.focus_token_learning_rate needs the focus words: set train.focus_words "
                             "(or data.synthetic.focus)")
        if self.prior.class_prompt is not None and self.train.what == "vae":
            raise ValueError("prior.class_prompt trains the UNet on class images: it needs train.what=unet or lora")
        return self


class DataCheckConfig(Strict):
    """``t2i data check DIR``: a dataset's summary and how well a model's VAE represents its images."""

    path: str
    """Dataset folder (images + metadata.jsonl / metadata.csv / side-car captions) or hub id."""
    model: str = "models/tiny-base"
    """Model dir whose VAE and tokenizer are checked against the data."""
    resolution: int | None = None
    """Side the images are cropped and resized to (default: the model's native size)."""
    caption_column: str = "text"
    """Column holding the caption."""
    image_column: str = "image"
    """Column holding the image (hub datasets)."""
    crop: Literal["center", "random"] = "center"
    """How a non-square image becomes square."""
    samples: int = Field(32, ge=1)
    """Images the VAE round trip is measured on (evenly spaced through the dataset)."""
    min_vae_psnr: float = 20.0
    """Round-trip PSNR (dB) under which the VAE counts as a poor fit for the data."""


class NewVAEArchitecture(Strict):
    """The fields of a diffusers ``AutoencoderKL`` config that a fresh VAE may change."""

    block_out_channels: list[int] = Field(min_length=1)
    """Channels per resolution level; n levels downsample by 2^(n-1)."""
    latent_channels: int = Field(ge=1)
    """Channels of the latent (the UNet's in/out channels)."""
    layers_per_block: int = Field(1, ge=1)
    """ResNet layers per level in the encoder (the decoder has one more)."""
    norm_num_groups: int = Field(16, ge=1)
    """GroupNorm groups; must divide every entry of block_out_channels."""


class AutoencoderConfig(Strict):
    """``t2i train-autoencoder``: fine-tune a model's VAE on a broad image mix (packaged photos,
    procedural textures, the synthetic world) while keeping its latents of the synthetic world, so a
    UNet trained on the old latent space stays valid."""

    base: str = "models/tiny-base"
    """Model dir whose VAE is fine-tuned (its vae/ folder)."""
    output_dir: str = "runs/vae-general"
    """Writes vae/ (the best held-out checkpoint, a diffusers AutoencoderKL folder) and metrics.jsonl."""
    steps: int = Field(4000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=2)
    """Images per step (photo crops + textures + synthetic scenes)."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate (100 warm-up steps, then cosine)."""
    synthetic_fraction: float = Field(0.3, ge=0, lt=1)
    """Share of each batch from the synthetic world (these carry the latent anchor)."""
    texture_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of each batch of procedural textures; the rest are packaged-photo crops."""
    anchor_weight: float = Field(1.0, ge=0)
    """Weight of ||E(x) - E_old(x)||^2 on the synthetic images, plus the reconstruction of D(E_old(x)):
    the encoder keeps the old latents of the world and the decoder still decodes them. 0 disables."""
    kl_weight: float = 1e-6
    """KL weight."""
    decoder_only: bool = False
    """Train the decoder alone (the latent space cannot move; less room to represent new images)."""
    held_out: list[str] = ["sklearn:china.jpg", "sklearn:flower.jpg", "skimage:coffee", "skimage:camera"]
    """Whole photos never trained on; the held-out PSNR is measured on crops of them."""
    new_architecture: NewVAEArchitecture | None = None
    """Train a freshly initialised VAE of this shape instead of fine-tuning the base's (the base's
    config with these fields replaced). Its latent space is new, so a UNet must be re-adapted to it;
    needs ``anchor_weight: 0`` when the latent channels differ."""
    eval_every: int = Field(250, ge=1)
    """Steps between evaluations (held-out photos, grayscale, synthetic world)."""
    select_by: Literal["photos", "synthetic"] = "photos"
    """Which evaluation's PSNR picks the checkpoint written to OUT/vae: the held-out photos', or the
    synthetic world's (to refine a decoder for the world without losing the photos: with
    ``min_psnr_photos``)."""
    min_psnr_photos: float | None = None
    """Keep only checkpoints whose held-out photo PSNR (dB) is at least this; none at all if no
    evaluation reaches it."""
    seed: int = 0
    """Seed of the crops, the scenes and the initialisation of the optimizer state."""
