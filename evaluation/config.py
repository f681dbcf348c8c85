"""The evaluation config (``t2i eval``, and the ``eval:`` section of a training config)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.config import ReferenceData, Strict

DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parents[1] / "models" / "domain-classifier"


class EvalConfig(Strict):
    num_images: int = Field(800, ge=4, le=10000)
    """Images generated (one per prompt; with new_concepts, half known and half new). FID estimates a
    covariance, so few images give noisy figures: compare models on the same number of images."""
    prompts: str | None = None
    """Text file with one prompt per line (default: the references' captions when references are given,
    else a fixed set drawn from the caption grammar)."""
    references: ReferenceData | None = None
    """Real images FID is measured against, e.g. the fine-tune's own dataset (a path or a hub id, or
    {path, image_column, caption_column}); its captions are the prompts unless ``prompts`` is set. A
    model of real images needs them: the default references are renders of the synthetic world, and
    prompts outside it have none. Adherence is scored only on prompts of the synthetic world."""
    new_concepts: list[str] = []
    """Concepts a fine-tune teaches (e.g. [star, heart, purple]); splits the report into known/new."""
    features: Literal["auto", "inception", "domain"] = "auto"
    """FID feature extractor: auto, inception or domain."""
    steps: int = Field(20, ge=1, le=200)
    """Sampling steps."""
    guidance: float = Field(5.0, ge=0, le=30)
    """Guidance scale."""
    scheduler: Literal["dpm", "ddim", "ddpm", "euler"] = "dpm"
    """Sampler: dpm, ddim, ddpm or euler."""
    seed: int = 0
    """Prompt set seed; image i uses seed + i."""
    reference_per_prompt: int = Field(10, ge=1, le=100)
    """Real images rendered per prompt (fresh jitter each) for the FID reference statistics; more make them
    closer to exact, so a change in FID comes from the generated images."""
    batch_size: int = Field(32, ge=1)
    """Images per sampling call."""
    device: Literal["cpu", "cuda"] | None = None
    """Where the images are sampled (default: cuda where available)."""
    clip_model: str | None = None
    """Local CLIP model dir for CLIP score (skipped with a note when absent)."""


class ClassifierConfig(Strict):
    output_dir: str = str(DEFAULT_CLASSIFIER_DIR)
    """Where the classifier is written (safetensors + config.json)."""
    train_images: int = Field(40000, ge=100)
    """Generator images rendered for training (all concepts, one shape each)."""
    test_images: int = Field(4000, ge=100)
    """Held-out images (another seed) for the per-head accuracy."""
    epochs: int = Field(4, ge=1)
    """Passes over the training images."""
    batch_size: int = 128
    """Batch size."""
    learning_rate: float = 2e-3
    """Peak learning rate (one-cycle)."""
    feature_dim: int = 128
    """Width of the penultimate features (the domain-FID embedding)."""
    width: int = 16
    """Channels of the first conv block."""
    seed: int = 0
    """Seed of the training images; the test set uses seed + 1."""


class EvalJob(EvalConfig):
    """``t2i eval MODEL --out DIR [--compare BASE]``: the evaluation settings plus what to evaluate."""

    model: str
    """Diffusers model dir to evaluate."""
    out: str
    """Folder for eval.json / compare.json and the image grids."""
    compare: str | None = None
    """Also evaluate this base model on the same prompts and seeds and compare (learning vs forgetting)."""
