"""bench.md (the table) and bench.png (latency against FID drift, Pareto front marked)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from core.io import atomic_write
from export.manifest import ExportManifest


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (latency, drift): nothing else is both faster and closer."""
    front = []
    for n, (lat, drift) in points.items():
        if not any((l2 <= lat and d2 <= drift) and (l2 < lat or d2 < drift) for m, (l2, d2) in points.items() if m != n):
            front.append(n)
    return sorted(front, key=lambda n: points[n][0])


def write_plot(manifest: ExportManifest, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = manifest.measured()
    b1 = manifest.plan.smallest_batch
    pts = {n: (1000 * e.bench.latency[b1].median_s, e.quality.fid_drift_pct) for n, e in measured.items()}
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for n, (x, y) in pts.items():
        ci = measured[n].quality.fid_drift_pct_ci
        if ci:
            ax.errorbar(x, y, yerr=[[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]], c="gray", lw=1, capsize=3, zorder=2)
        ax.scatter(x, y, s=60, c="tab:green" if measured[n].within_budget else "tab:red", zorder=3,
                   marker="*" if n == manifest.selected else "o")
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(front) > 1:
        ax.plot([pts[n][0] for n in front], [pts[n][1] for n in front], "--", c="gray", zorder=2, label="Pareto front")
    ax.axhline(manifest.budget.max_fid_drift_pct, c="tab:orange", lw=1, label="FID drift budget (95% CI inside)")
    ax.axhline(-manifest.budget.max_fid_drift_pct, c="tab:orange", lw=1)
    ax.set_xlabel(f"latency per image at batch {b1} (ms, median)")
    ax.set_ylabel(f"FID drift vs {manifest.baseline} (%)")
    ax.set_title(f"Variants of {Path(manifest.model_dir).name} on {manifest.device}"
                 f" (selected: {manifest.selected})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def bench_table(manifest: ExportManifest) -> str:
    bs = manifest.plan.batch_sizes
    b1 = manifest.plan.smallest_batch
    base = manifest.variants.get(manifest.baseline)
    base_lat = base.bench.latency[b1].median_s if base and base.bench else None
    head = ("| variant | " + " | ".join(f"ms/img b{b} (best / p50 / p95)" for b in bs)
            + f" | speed-up b{b1} (p50) | UNet ms/step | load s | warm-up s | peak MB (own) | size MB | FID | drift % [95% CI] "
            "| adherence (change [95% CI]) | PSNR dB | SSIM | in budget |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    measured = manifest.measured()
    for n, e in manifest.variants.items():
        if n not in measured:
            lines.append(f"| {n} | {e.status}: {e.reason or ''} |")
            continue
        lat, q, bench = e.bench.latency, e.quality, e.bench
        cells = [(f"{1000 * lat[b].min_s:.0f} / " if lat[b].min_s is not None else "- / ")
                 + f"{1000 * lat[b].median_s:.0f} / {1000 * lat[b].p95_s:.0f}" for b in bs]
        speed = f"{base_lat / lat[b1].median_s:.2f}x" if base_lat else "-"
        mark = " (selected)" if n == manifest.selected else ""
        lines.append(f"| {n}{mark} | " + " | ".join(cells) + f" | {speed} | {lat[b1].unet_step_ms:.1f} | "
                     f"{bench.load_s:.1f} | {bench.warmup_s:.1f} | {bench.peak_rss_mb:.0f} ({bench.variant_rss_mb or 0:.0f}) | "
                     f"{e.size_mb:.1f} | {q.fid:.2f} | {q.fid_drift_pct:+.1f}{_ci(q.fid_drift_pct_ci)} | {_adherence(q)} | "
                     f"{q.psnr_db_median:.1f} | {q.ssim:.3f} | "
                     f"{_in_budget(e)} |")
    return "\n".join(lines)


def _in_budget(e) -> str:
    return ("yes (exact)" if e.exact else "yes") if e.within_budget else "no"


def _adherence(q) -> str:
    if q.adherence is None:
        return "not measured"
    return f"{q.adherence:.1f} ({-q.adherence_drop:+.1f}{_ci(q.adherence_drop_ci, -1)})"


def _ci(ci: list[float] | None, sign: int = 1) -> str:
    if not ci:
        return ""
    lo, hi = sorted(sign * v for v in ci)
    return f" [{lo:+.1f}, {hi:+.1f}]"


def resolution(manifest: ExportManifest) -> str:
    """What the gate can resolve: the median half-width of the variants' intervals."""
    qs = [e.quality for n, e in manifest.measured().items() if n != manifest.baseline and e.quality.fid_drift_pct_ci]
    if not qs:
        return ""
    half = lambda ci: (ci[1] - ci[0]) / 2  # noqa: E731
    b = manifest.budget
    adh = [half(q.adherence_drop_ci) for q in qs if q.adherence_drop_ci]
    widths = (f"+-{np.median(adh):.1f} adherence points and " if adh else "") + \
        f"+-{np.median([half(q.fid_drift_pct_ci) for q in qs]):.1f}% FID drift"
    return (f"Gate: {b.gate_images} images, {100 * (b.confidence or 0):.0f}% intervals ({b.resamples} paired "
            "bootstrap resamples for the FID drift, the matched pairs' counts for adherence); a variant is in "
            "budget when its whole interval is, an exact one (every image the baseline's within its runtime's "
            f"rounding) by construction. With these images the intervals are {widths} wide (median): smaller "
            "differences are not resolved.\n\n")


def _retimed(manifest: ExportManifest) -> str:
    b1 = manifest.plan.smallest_batch
    runs = {n: e.bench.latency[b1].processes for n, e in manifest.measured().items()
            if (e.bench.latency[b1].processes or 1) > 1}
    if not runs:
        return ""
    return (f"Re-timed at batch {b1} in alternating processes (the close contenders): "
            + ", ".join(f"{n} ({k} processes)" for n, k in runs.items())
            + f"; their batch-{b1} figures pool the repeats of all of them, so a slow spell of the host "
            "during one process is far less likely to decide the choice.\n\n")


def _prompt_source(config: dict) -> str:
    if config.get("prompts"):
        return f"prompts from {config['prompts']}"
    if config.get("references"):
        return "prompts: the references' captions"
    return "prompts of the synthetic world"


def write_bench_md(manifest: ExportManifest, path: Path) -> None:
    hw, plan, budget, measured = manifest.hardware, manifest.plan, manifest.budget, manifest.measured()
    q0 = next(iter(measured.values())).quality if measured else None
    features = q0.features if q0 else "-"
    refs = manifest.config.get("references")
    against = (f"FID against {q0.reference_images if q0 and q0.reference_images else 'the'} images of "
               f"{refs['path']}" if refs else "FID against renders of the prompts' scenes")
    text = (f"# Export benchmark: {manifest.model_dir}\n\n"
            f"Device: {manifest.device} ({hw.cpu}{', ' + hw.gpu if hw.gpu else ''}, {hw.threads} threads). "
            f"Same prompts, seeds, scheduler and {plan.steps} steps for every variant; "
            f"{plan.num_images} quality images ({_prompt_source(manifest.config)}), drawn {max(plan.batch_sizes)} at a "
            f"time (the largest timed batch); {against}; FID features: "
            f"{features}.\n"
            f"Budget: FID drift <= {budget.max_fid_drift_pct}%, "
            + (f"adherence drop <= {budget.max_adherence_drop_pts} pts" if q0 is None or q0.adherence is not None
               else "adherence drop: not applied (not measured)") + f". Selected: **{manifest.selected}** "
            f"({manifest.selection_reason}).\n\n" + resolution(manifest) + bench_table(manifest) + "\n\n"
            + _retimed(manifest)
            + f"UNet: {hw.unet_gflop_per_step_b1} GFLOP per guided step at batch 1; measured fp32 "
            f"matmul peak {hw.matmul_fp32_gflops} GFLOP/s. Achieved UNet GFLOP/s per variant: "
            + ", ".join(f"{n} {e.bench.unet_gflops_per_s}" for n, e in measured.items()) + ".\n\n"
            "![latency vs FID drift](bench.png)\n")
    atomic_write(path, text)
