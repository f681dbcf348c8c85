"""Paired intervals for a variant's quality against a baseline's, on the same prompts and seeds: FID
drift by paired bootstrap (both FIDs against the same fixed reference statistics, recomputed on each
resample of the image indices), prompt-adherence drop from the matched pairs' counts (per image: right
or wrong on each side).

With 48 images one image changing its adherence moves the drop by 2 points; the interval says how
far the measurement can be trusted, and the export gate accepts a variant only when the whole
interval is inside the budget. The adherence interval is Agresti and Min's adjusted Wald interval for
matched proportions (half a pair added to each cell of the 2x2 table; Statistics in Medicine 2005), not
a bootstrap: where no image changed, a bootstrap of the changes is [0, 0] however few images there
were, so a variant that flips about one image in a hundred passed a 2-point budget whenever the 48
drawn contained none (onnx-int8 on the demo: no flip in two of four disjoint sets of 48 prompts, an
interval of [0, 0]; [0, +6.2] and [0, +8.3] points in the other two). Here no change in 48 images
still leaves +-3.9 points; in 800, +-0.2.

What the FID-drift interval covers is the drift *as measured with that many images*: FID itself is
biased at small sample sizes, more so with more feature dimensions. In a synthetic case with 128
features (the domain classifier's), the drift measured with 48 images averaged 3.1% where the
populations' drift was 5.4% (docs/experiments.md); more gate images (``export.num_images``) move the
measured drift towards the population's.
"""
from __future__ import annotations

import numpy as np
import torch


def features(images: np.ndarray, kind: str, classifier=None, batch: int = 128) -> np.ndarray:
    """FID features (float64, N x D) of uint8 NHWC images, with the extractor ``evaluation.fid`` uses."""
    from evaluation.fid import make_metric

    extractor = make_metric(kind, classifier).inception
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2)
            out.append(extractor(x).double().numpy())
    return np.concatenate(out)


def moments(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr sqrt(C1 C2), the trace
    of the root taken from the eigenvalues of C1 C2 (as torchmetrics does)."""
    ev = np.linalg.eigvals(cov1 @ cov2)
    root = np.sqrt(np.clip(ev.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * root)


def interval(samples: np.ndarray, conf: float, estimate: float | None = None) -> list[float]:
    """Percentile interval of bootstrap ``samples``; with ``estimate`` (the statistic on the original
    sample), moved by the bootstrap's median bias (median(samples) - estimate) first.

    FID on a resample is biased: its repeated images shrink the feature covariance, both FIDs grow
    and the drift between them shrinks, so at 48 images the plain percentile interval can miss its
    own point estimate (measured on the demo: +3.3% against [-0.5, +2.9]). Centring the resamples'
    median on the estimate removes that; ``tests/test_gate.py`` checks the coverage on a synthetic case.
    """
    shift = float(np.median(samples)) - estimate if estimate is not None else 0.0
    lo, hi = np.quantile(samples, [(1 - conf) / 2, 1 - (1 - conf) / 2]) - shift
    return [round(float(lo), 3), round(float(hi), 3)]


def _drift(base: np.ndarray, var: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> float:
    fb = frechet(*moments(base), *ref)
    fv = frechet(*moments(var), *ref)
    return 100 * (fv - fb) / fb if fb > 0 else 0.0


def adherence_interval(base_hits: np.ndarray, var_hits: np.ndarray, conf: float = 0.95) -> list[float]:
    """Interval of the adherence drop (points) over the scored images (``*_hits`` 1 right, 0 wrong, NaN
    not scored): Agresti-Min's Wald interval with 0.5 added to each cell of the matched-pairs table,
    from b (right -> wrong) and c (wrong -> right) of n pairs."""
    from statistics import NormalDist

    s = ~np.isnan(base_hits)
    n = int(s.sum())
    if n == 0:
        return [0.0, 0.0]
    b = int(((base_hits[s] == 1) & (var_hits[s] == 0)).sum())
    c = int(((base_hits[s] == 0) & (var_hits[s] == 1)).sum())
    z = NormalDist().inv_cdf(1 - (1 - conf) / 2)
    drop = (b - c) / (n + 2)
    sd = np.sqrt((b + c + 1) - (b - c) ** 2 / (n + 2)) / (n + 2)
    lo, hi = max(-1.0, drop - z * sd), min(1.0, drop + z * sd)
    return [round(100 * lo, 3), round(100 * hi, 3)]


def paired(base_feats: np.ndarray, var_feats: np.ndarray, ref: tuple[np.ndarray, np.ndarray],
           base_hits: np.ndarray, var_hits: np.ndarray, resamples: int = 400, conf: float = 0.95,
           seed: int = 0) -> dict:
    """Intervals of FID drift (% of the baseline's FID), from ``resamples`` draws of the image indices
    with replacement, the same indices for the baseline and the variant, and of adherence drop (points,
    ``adherence_interval``). ``*_hits``: per image 1 (adherent), 0 (not) or NaN (the prompt is not
    scored)."""
    n = len(base_feats)
    if len(var_feats) != n or len(base_hits) != n or len(var_hits) != n:
        raise ValueError("paired bootstrap needs the same images (prompts and seeds) on both sides")
    rng = np.random.default_rng(seed)
    drift = [_drift(base_feats[idx], var_feats[idx], ref) for idx in (rng.integers(0, n, n) for _ in range(resamples))]
    return {"fid_drift_pct_ci": interval(np.array(drift), conf, _drift(base_feats, var_feats, ref)),
            "adherence_drop_ci": adherence_interval(base_hits, var_hits, conf),
            "images": n, "resamples": resamples, "confidence": conf}
