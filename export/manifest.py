"""The export manifest, ``EXPORT_DIR/export.json``: which variants export built, how to load each,
what it measured, and which one it selected.

Export writes it with ``write_manifest``; the loader, serving, the pipeline and the reports read it
with ``read_manifest`` and get these typed models, never a raw dict. A bad file (missing, not
UTF-8, not JSON, not this schema, a variant folder outside the export dir) is one ``UserError``
line. ``docs/export-json.md`` holds ``schema_markdown()``; a test keeps the two in step.
"""
from __future__ import annotations

import json
import types
import typing
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, field_validator, model_serializer, model_validator

from core.config import Strict
from core.errors import UserError
from core.io import write_json

FILENAME = "export.json"
SCHEMA_VERSION = 1


class _OmitNone(Strict):
    """Fields that do not apply (None) are left out of the JSON, as export has always written them."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class Budget(_OmitNone):
    """The quality budget a variant must meet to be selected."""

    max_fid_drift_pct: float
    """Largest |FID drift| from the baseline, in % of the baseline's FID."""
    max_adherence_drop_pts: float
    """Largest drop of prompt adherence (shape and colour right, %) from the baseline, in points."""
    gate_images: int | None = None
    """Images (prompt, seed pairs) the gate's intervals were measured on."""
    resamples: int | None = None
    """Paired bootstrap resamples behind the FID-drift interval."""
    confidence: float | None = None
    """Confidence of the intervals (0.95)."""


class Plan(Strict):
    """What every variant was measured on: the same prompts, seeds, scheduler, steps and guidance."""

    batch_sizes: list[int]
    """Batch sizes timed; the smallest one decides the selection."""
    steps: int
    """Sampling steps per image."""
    guidance: float
    """Guidance scale."""
    repeats: int
    """Timed runs per batch size, after warm-up."""
    num_images: int
    """Quality prompts, one image each, per variant."""
    seed: int
    """Seed of the quality prompt set; image i uses seed + i."""

    @property
    def smallest_batch(self) -> int:
        return min(self.batch_sizes)


class Hardware(_OmitNone):
    """The machine the figures were measured on."""

    cpu: str
    """CPU name (or architecture)."""
    threads: int
    """Torch intra-op threads."""
    matmul_fp32_gflops: float
    """Measured fp32 matmul throughput (1024x1024), GFLOP/s."""
    unet_gflop_per_step_b1: float
    """GFLOP of one guided UNet step at batch 1."""
    gpu: str | None = None
    """GPU name, for a cuda export."""


class LoadHint(Strict):
    """How to load the variant."""

    registry: str
    """Name in ``export.variants.REGISTRY`` whose ``load`` reads the folder."""
    call: str
    """The Python call that loads it."""


class Latency(_OmitNone):
    """Time per image at one batch size."""

    median_s: float
    """Median seconds per image."""
    p95_s: float
    """95th-percentile seconds per image."""
    min_s: float | None = None
    """Fastest repeat's seconds per image: what the selector ranks by, since timing noise from other
    processes only ever adds time (absent in manifests written before it was measured)."""
    unet_step_ms: float
    """Mean milliseconds per UNet call (the lowest of the processes that timed it)."""
    repeats_s: list[float] | None = None
    """Every timed repeat's seconds per image, sorted, pooled over the processes that timed this batch
    size: what median, p95 and min are computed from (absent in manifests written before it)."""
    processes: int | None = None
    """Processes that timed this batch size: 1 (the variant's benchmark run), more where the export's
    re-timing rounds timed it again (absent in manifests written before it)."""

    @property
    def rank_s(self) -> float:
        """Seconds per image the selector compares: the fastest repeat, or the median where not measured
        (a manifest written before min_s; one bench run measures it for every variant or none)."""
        return self.min_s if self.min_s is not None else self.median_s


class Bench(_OmitNone):
    """Speed and memory, measured in a fresh process that loads the variant from its folder."""

    load_s: float
    """Seconds to load the variant from disk."""
    warmup_s: float
    """Seconds of the first call per batch size (allocation, compilation, graph setup)."""
    latency: dict[int, Latency]
    """Per batch size (a string key in the JSON)."""
    peak_rss_mb: float
    """Peak resident memory of the process while the variant loaded and ran, MiB (sampled every 5 ms)."""
    variant_rss_mb: float | None = None
    """That peak minus the process's memory before the variant loaded (its libraries imported), MiB:
    what the variant itself needs."""
    peak_gpu_mb: float | None = None
    """Peak allocated GPU memory, MiB (cuda only)."""
    info: dict[str, Any] = {}
    """What the loaded generator reports about itself."""
    unet_gflops_per_s: float | None = None
    """Achieved UNet GFLOP/s at the smallest batch size."""
    unet_fraction_of_fp32_peak: float | None = None
    """unet_gflops_per_s over hardware.matmul_fp32_gflops."""


class Quality(_OmitNone):
    """The variant's images against references and against the baseline's images (same prompts, seeds)."""

    features: str
    """FID feature extractor used: inception or domain."""
    fid: float
    """FID against the reference images: renders of the prompts' scenes, or the export's references
    dataset (``config.references``)."""
    reference_images: int | None = None
    """Images in the FID reference set."""
    fid_drift: float
    """fid minus the baseline's fid."""
    fid_drift_pct: float
    """fid_drift in % of the baseline's fid."""
    fid_vs_baseline: float
    """FID between this variant's images and the baseline's."""
    psnr_db_median: float
    """Median PSNR against the baseline's image of the same prompt and seed, dB (identical: 100)."""
    ssim: float
    """SSIM against the baseline's images."""
    mean_abs_px_diff: float
    """Mean absolute pixel difference from the baseline's images (0-255)."""
    max_image_abs_px_diff: float | None = None
    """The largest of the images' own mean absolute pixel differences from the baseline's (0-255): what
    decides whether an exact backend drew the baseline's images on every gate image."""
    adherence: float | None = None
    """Prompt adherence (shape and colour right), %; absent when no quality prompt is of the synthetic
    world (the domain classifier cannot read other images), and the adherence budget does not apply."""
    adherence_drop: float | None = None
    """Baseline adherence minus this variant's, points (absent with adherence)."""
    within_tolerance: bool
    """mean_abs_px_diff <= tolerance_px."""
    fid_drift_pct_ci: list[float] | None = None
    """Paired bootstrap interval of fid_drift_pct ([low, high]; same prompts and seeds resampled for the
    baseline and the variant). The gate needs all of it inside the FID budget."""
    adherence_drop_ci: list[float] | None = None
    """Interval of adherence_drop ([low, high]) from the matched pairs (each image right or wrong for the
    baseline and the variant; Agresti-Min's adjusted Wald interval). The gate needs its upper end inside
    the adherence budget."""


class VariantEntry(_OmitNone):
    """One variant: built (ok), not buildable here (skipped) or broken (failed)."""

    status: Literal["ok", "skipped", "failed"]
    """ok: built and benchmarked; skipped: this hardware cannot run it; failed: build or benchmark broke."""
    reason: str | None = None
    """Why it was skipped or failed (required then)."""
    dir: str | None = None
    """Its folder, relative to the export dir (required when ok; never absolute or with '..')."""
    build_s: float | None = None
    """Seconds to build it (once built)."""
    reused: bool | None = None
    """True when its folder was kept from an earlier export into this dir: built from the same model,
    settings, code and library versions, and unchanged since (see build.json; rebuild=true turns it off)."""
    size_mb: float | None = None
    """Size of its folder, MiB (once built)."""
    tolerance_px: float | None = None
    """Largest mean absolute pixel difference from the baseline its parity check allows (once built)."""
    notes: dict[str, Any] | None = None
    """What its build reported: format, precision, per-part errors, ... (once built)."""
    load: LoadHint | None = None
    """How to load it (once built)."""
    bench: Bench | None = None
    """Speed and memory (once benchmarked)."""
    quality: Quality | None = None
    """Image quality against the references and the baseline (once benchmarked)."""
    within_budget: bool | None = None
    """Whether its quality meets the budget (once measured): an exact variant's does by construction,
    another's when its whole intervals are inside the budget."""
    exact: bool | None = None
    """An exact backend (fp32 arithmetic in another runtime: parity tolerance <= 2 of 255 levels) whose
    every gate image is the baseline's within that tolerance (max_image_abs_px_diff): its quality is the
    baseline's, so the gate's intervals (shown) do not decide it (once measured)."""

    @field_validator("dir")
    @classmethod
    def _inside_export_dir(cls, d: str | None) -> str | None:
        if d is None:
            return d
        win = PureWindowsPath(d)
        if not d or PurePosixPath(d).is_absolute() or win.is_absolute() or win.drive or ".." in win.parts:
            raise ValueError(f"dir {d!r} must be a folder inside the export dir (relative, no '..')")
        return d

    @model_validator(mode="after")
    def _status_fields(self) -> VariantEntry:
        if self.status == "ok" and self.dir is None:
            raise ValueError("a variant with status ok needs its dir")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"a variant with status {self.status} needs a reason")
        return self


class ExportManifest(Strict):
    """export.json: the whole export dir in one document."""

    schema_version: int = SCHEMA_VERSION
    """Version of this layout (absent in files from before it was versioned: 1)."""
    model_dir: str
    """The model dir that was exported."""
    device: Literal["cpu", "cuda"]
    """Device the variants were built for and measured on; the loader's default."""
    created: str
    """Local time of the export, YYYY-MM-DD HH:MM:SS."""
    config: dict[str, Any]
    """The resolved export config, as given (see ``t2i export --help``)."""
    budget: Budget
    """The quality budget of the selection."""
    plan: Plan
    """What every variant was measured on (absent in older files: taken from config)."""
    baseline: str = "eager-fp32"
    """The reference variant that drift is measured from."""
    hardware: Hardware
    """The machine."""
    variants: dict[str, VariantEntry]
    """Every variant asked for, by name, the baseline first."""
    selected: str | None = None
    """The variant the loader, serving and the Bento use by default; null when none met the budget."""
    selection_reason: str = ""
    """Why that one."""
    bundled_from: str | None = None
    """In a Bento's copy: the export dir it was bundled from (the copy lists only the bundled variant)."""

    @model_validator(mode="before")
    @classmethod
    def _older_files(cls, data: Any) -> Any:
        if isinstance(data, dict) and "plan" not in data and isinstance(data.get("config"), dict):
            data = {**data, "plan": {k: data["config"][k] for k in Plan.model_fields if k in data["config"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ExportManifest:
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is newer than this t2i reads "
                             f"({SCHEMA_VERSION}); upgrade t2i")
        if self.selected is not None and self.selected not in self.ok_variants():
            raise ValueError(f"selected variant {self.selected!r} is not a built (ok) variant")
        return self

    def ok_variants(self) -> dict[str, VariantEntry]:
        """The variants that were built and benchmarked."""
        return {n: e for n, e in self.variants.items() if e.status == "ok"}

    def measured(self) -> dict[str, VariantEntry]:
        """The built variants with both speed and quality figures."""
        return {n: e for n, e in self.ok_variants().items() if e.bench is not None and e.quality is not None}

    def variant(self, name: str | None, export_dir: str | Path) -> tuple[str, VariantEntry]:
        """``name`` (default: the selected one) and its entry; a UserError when it cannot be loaded."""
        name = name or self.selected
        if not name:
            raise UserError(f"{export_dir}/{FILENAME} selects no variant; pass one of {list(self.ok_variants())}")
        entry = self.variants.get(name)
        if entry is None or entry.status != "ok":
            why = entry.reason if entry else "not in the manifest"
            raise UserError(f"variant {name} cannot be loaded from {export_dir}: {why}; "
                            f"built variants: {list(self.ok_variants())}")
        return name, entry


def read_manifest(export_dir: str | Path) -> ExportManifest:
    """Reads and checks ``EXPORT_DIR/export.json``; any problem is one UserError line."""
    path = Path(export_dir) / FILENAME
    if not path.is_file():
        raise UserError(f"{export_dir} is not an export dir (no {FILENAME}); create one with `t2i export`")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-run `t2i export`") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); re-run `t2i export`") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a valid export manifest: the top level must be a JSON object")
    try:
        return ExportManifest.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{path} is not a valid export manifest: {_explain(e)}") from None


def write_manifest(path: str | Path, manifest: ExportManifest) -> Path:
    """Writes ``manifest`` to ``path`` (normally ``EXPORT_DIR/export.json``) atomically."""
    return write_json(path, manifest.model_dump(mode="json", fallback=_plain))


def _plain(value: Any) -> Any:
    """A value in a free-form field (a variant's notes) that JSON has no type for: numpy scalars become
    numbers, anything else its text."""
    return value.item() if hasattr(value, "item") else str(value)


def _explain(e: ValidationError, limit: int = 3) -> str:
    msgs = []
    for err in e.errors()[:limit]:
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown key '{where}'")
        elif err["type"] == "missing":
            msgs.append(f"'{where}' is missing")
        else:
            text = err["msg"].removeprefix("Value error, ")
            msgs.append(f"'{where}': {text}" if where else text)
    more = len(e.errors()) - limit
    return "; ".join(msgs) + (f" (and {more} more)" if more > 0 else "")


# ============================================================================ the documented schema

SECTIONS = (ExportManifest, Budget, Plan, Hardware, VariantEntry, LoadHint, Bench, Latency, Quality)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    if t is Any:
        return "any"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return f"[{t.__name__}](#{t.__name__.lower()})"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is dict:
        return f"object: {_type_name(args[0])} → {_type_name(args[1])}"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(t, "__name__", str(t))


def schema_markdown() -> str:
    """The field tables of docs/export-json.md, from the models' annotations and field docstrings."""
    out = []
    for model in SECTIONS:
        out += [f"### {model.__name__}", "", (model.__doc__ or "").strip(), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            kind = f.annotation
            default = "required" if f.is_required() else f"`{json.dumps(f.get_default(call_default_factory=True))}`"
            if issubclass(model, _OmitNone) and not f.is_required() and f.default is None:
                # None is never written for these: the key is absent instead
                kind, default = typing.Union[tuple(a for a in typing.get_args(kind) if a is not type(None))], "absent"
            doc = " ".join((f.description or "").split()).replace("|", "\\|")
            out.append(f"| `{name}` | {_type_name(kind)} | {default} | {doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
