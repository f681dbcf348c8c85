"""FID (Heusel et al. 2017) through torchmetrics, with a choice of feature extractor and cached
reference statistics.

Extractors:
- ``inception``: the standard FID (torchmetrics' InceptionV3 from torch-fidelity). Its weights
  must be on disk (``T2I_INCEPTION_WEIGHTS`` or torch's hub cache) or downloadable; otherwise a
  clear error says how to supply them. Never a silent fallback.
- ``domain``: the penultimate features of the project's domain classifier (FID as on MNIST with
  a LeNet).
- ``auto``: ``inception`` where its weights are present, else ``domain``.

Reference statistics (the metric's accumulated sums) are cached under a key that hashes every
reference image's bytes and the extractor, so a changed reference set is never served stale.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def cache_dir() -> Path:
    from core.io import cache_home

    return cache_home() / "fid-stats"


def inception_weights() -> Path | None:
    """The local InceptionV3 FID weights, if any (env var first, then torch's hub cache)."""
    env = os.environ.get("T2I_INCEPTION_WEIGHTS")
    if env:
        if not Path(env).is_file():
            raise UserError(f"T2I_INCEPTION_WEIGHTS={env} does not exist")
        return Path(env)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return hub if hub.is_file() else None


class DomainFeatures(torch.nn.Module):
    """uint8 NCHW images -> domain classifier features (torchmetrics' custom-feature contract)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config["feature_dim"]

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(imgs.permute(0, 2, 3, 1).contiguous())


def resolve_features(kind: str) -> str:
    if kind not in ("auto", "inception", "domain"):
        raise UserError(f"unknown feature extractor {kind!r}; choose auto, inception or domain")
    if kind == "auto":
        return "inception" if inception_weights() and _has_fidelity() else "domain"
    return kind


def _has_fidelity() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_fidelity") is not None


def make_metric(kind: str, classifier=None):
    """A fresh torchmetrics FrechetInceptionDistance for extractor ``kind`` (already resolved)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if kind == "domain":
        if classifier is None:
            from evaluation.classifier import load_classifier
            classifier = load_classifier()
        return FrechetInceptionDistance(feature=DomainFeatures(classifier), reset_real_features=False)
    if not _has_fidelity():
        raise UserError("Inception FID needs torch-fidelity: pip install 't2i-sprint[inception]', then supply "
                        f"the weights file {INCEPTION_FILE} (T2I_INCEPTION_WEIGHTS=/path); or use --features domain")
    weights = inception_weights()
    try:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                        feature_extractor_weights_path=str(weights) if weights else None)
    except Exception as e:  # offline download failure, or torch-fidelity missing
        raise UserError(
            f"the Inception FID weights are not available ({type(e).__name__}: {str(e)[:120]}). Download "
            f"{INCEPTION_FILE} from github.com/toshas/torch-fidelity/releases on a machine that is online, then "
            f"set T2I_INCEPTION_WEIGHTS=/path/to/it (or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}); "
            "or use --features domain") from None


def _extractor_id(kind: str) -> str:
    if kind == "inception":
        w = inception_weights()
        return f"inception:{w.stat().st_size if w else 'download'}"
    from evaluation.classifier import DEFAULT_DIR

    return "domain:" + hashlib.sha256((DEFAULT_DIR / "model.safetensors").read_bytes()).hexdigest()[:16]


def reference_key(images: np.ndarray, kind: str) -> str:
    h = hashlib.sha256(_extractor_id(kind).encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:24]


def add_images(metric, images: np.ndarray, real: bool, batch: int = 128) -> None:
    """images: uint8 NHWC."""
    for i in range(0, len(images), batch):
        metric.update(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2), real=real)


def load_reference(metric, images: np.ndarray, kind: str) -> dict:
    """Fills the metric's real-image statistics, from the cache when the same set was seen before."""
    key = reference_key(images, kind)
    path = cache_dir() / f"{kind}-{key}.safetensors"
    if path.exists():
        state = load_file(path)
        for name in _REAL_STATES:
            setattr(metric, name, state[name])
        return {"key": key, "cached": True, "n": len(images)}
    add_images(metric, images, real=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({name: getattr(metric, name).contiguous() for name in _REAL_STATES}, str(tmp))
    os.replace(tmp, path)
    return {"key": key, "cached": False, "n": len(images)}


def fid(generated: np.ndarray, reference: np.ndarray, kind: str, classifier=None, cache: bool = True) -> float:
    """FID between two uint8 NHWC image sets, with ``reference`` statistics cached."""
    if len(generated) < 2 or len(reference) < 2:
        raise UserError("FID needs at least 2 images in each set")
    metric = make_metric(kind, classifier)
    if cache:
        load_reference(metric, reference, kind)
    else:
        add_images(metric, reference, real=True)
    add_images(metric, generated, real=False)
    return float(metric.compute())
