"""The export config (``t2i export``, and the ``export:`` section of a pipeline config)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import ReferenceData, Strict

# Variants built when none are named: every one; those the hardware cannot run are skipped with a reason.
DEFAULT_VARIANTS = ["eager-fp32", "eager-bf16", "eager-fp16", "int8-torchao", "int8-bnb", "compile", "int8-static",
                    "onnx-fp32", "onnx-fp16", "onnx-int8"]


class ExportConfig(Strict):
    model: str
    """Model dir to export (a diffusers SD folder)."""
    out: str
    """Export dir to write."""
    variants: list[str] = DEFAULT_VARIANTS
    """Variants to build and consider (eager-fp32 is always built as the reference). Approximate ones are
    BASE+trunc<F>, BASE+cache<N>[from<F>], BASE+tome<R>, chainable (e.g. onnx-int8+cache2from0.5+trunc0.3)."""
    max_fid_drift: float = Field(5.0, ge=0)
    """Quality budget: FID drift from eager-fp32, in % of its FID."""
    max_adherence_drop: float = Field(2.0, ge=0)
    """Quality budget: drop of prompt adherence (shape+colour) in points."""
    bootstrap_resamples: int = Field(400, ge=20)
    """Paired bootstrap resamples behind the FID drift's 95% interval (a variant is in budget when its
    whole intervals are; the adherence drop's comes from the matched pairs' counts)."""
    latency_tie_pct: float = Field(5.0, ge=0)
    """In-budget variants within this % of the fastest's latency (each one's fastest repeat) count as
    tied; the most exact one (smallest worst-case drift) is selected, so timing noise does not flip
    the choice."""
    retime_rounds: int = Field(2, ge=0)
    """Re-timing rounds after the gate: the in-budget variants within retime_within_pct of the fastest are
    timed again at the smallest batch size, each round a fresh process per variant, the contenders in
    alternating order, and ranked by the best repeat of all their runs. A slow spell of a shared host
    lasts seconds, long enough to slow every repeat of one benchmark process; alternating processes
    spread each variant's timing over the whole comparison. 0 turns it off."""
    retime_within_pct: float = Field(50.0, ge=0)
    """Which variants are re-timed: those whose best repeat is within this % of the fastest's (a slow
    spell measured 45% on this class of host)."""
    num_images: int = Field(100, ge=4)
    """Quality prompts (images per variant)."""
    batch_sizes: list[int] = [1, 4]
    """Batch sizes timed (and warmed up for compile)."""
    bench_timeout_s: float = Field(3600, gt=0)
    """Longest a variant's benchmark process may run; one that runs longer is stopped and marked failed."""
    repeats: int = Field(5, ge=1)
    """Timed runs per batch size, after warm-up; the table shows the best, median and p95 of them, the
    selector ranks by the best."""
    steps: int = Field(20, ge=1, le=200)
    """Sampling steps (the same for every variant)."""
    guidance: float = 5.0
    """Guidance scale."""
    features: Literal["auto", "inception", "domain"] = "auto"
    """FID feature extractor: auto, inception or domain."""
    rebuild: bool = False
    """Build every variant afresh. By default an export into a dir that holds an earlier export keeps each
    variant folder built from the same model, settings its build reads, code, library versions and device
    whose files are unchanged (build.json records them), so a new gate re-benchmarks without rebuilding and
    an interrupted export resumes; the variant folders the new export does not list are removed."""
    select: str | None = None
    """Force this variant as the selected one (it must have been built)."""
    device: Literal["cpu", "cuda"] | None = None
    """cpu or cuda (default: cuda where available)."""
    seed: int = 0
    """Prompt-set seed."""
    prompts: str | None = None
    """Text file with one quality prompt per line (default: the references' captions when references are
    given, else a fixed set drawn from the synthetic world's caption grammar)."""
    references: ReferenceData | None = None
    """Real images the FID drift is measured against, e.g. the fine-tune's own dataset (a path or a hub id,
    or {path, image_column, caption_column}). A model of real images needs them: the default references
    are renders of the synthetic world, and prompts outside that world have no render. The pipeline
    uses the training data when it is not synthetic. Prompt adherence is scored only on prompts of the
    synthetic world; with none, the adherence budget does not apply."""
