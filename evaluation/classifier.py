"""The domain classifier: a small CNN trained on the synthetic generator's ground truth.

Its heads (shape, colour, position, size, background) score prompt adherence; its penultimate
features are the embedding of the domain FID, as FID on MNIST is computed with a LeNet's
features. It is trained by ``t2i train-classifier configs/domain-classifier.yaml`` and
shipped under ``models/domain-classifier`` (safetensors + config.json).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from synthetic.world import ATTRIBUTES, WorldSpec, render_scene, sample_scene
from core.errors import UserError
from evaluation.config import DEFAULT_CLASSIFIER_DIR, ClassifierConfig

HEADS = ["shape", "colour", "position", "size", "background"]
INPUT_SIZE = 64
DEFAULT_DIR = DEFAULT_CLASSIFIER_DIR


class DomainClassifier(nn.Module):
    """Conv stack -> ``feature_dim`` features -> one linear head per attribute."""

    def __init__(self, feature_dim: int = 128, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        # Flatten the 4x4 map (no global pooling): position must survive to the features.
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({h: nn.Linear(feature_dim, len(ATTRIBUTES[h])) for h in HEADS})
        self.config = {"feature_dim": feature_dim, "width": width}

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float NCHW in [0,1] -> float NCHW in [-1,1] at 64x64."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 255.0
        if images.shape[-1] != INPUT_SIZE:
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.body(self.preprocess(x)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, list[str]]:
        self.eval()
        out = {h: [] for h in HEADS}
        for i in range(0, len(images), batch):
            logits = self(images[i:i + batch])
            for h in HEADS:
                out[h] += [ATTRIBUTES[h][j] for j in logits[h].argmax(1).tolist()]
        return out

    def save(self, out_dir: str | Path, metrics: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()
                   if v.dtype.is_floating_point}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({**self.config, "heads": {h: ATTRIBUTES[h] for h in HEADS},
                                                     "metrics": metrics or {}}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return out_dir


def load_classifier(path: str | Path | None = None) -> DomainClassifier:
    path = Path(path or DEFAULT_DIR)
    if not (path / "model.safetensors").exists():
        raise UserError(f"domain classifier not found at {path} (train it with "
                        "`t2i train-classifier configs/domain-classifier.yaml`)")
    cfg = json.loads((path / "config.json").read_text())
    for h in HEADS:
        if cfg["heads"][h] != ATTRIBUTES[h]:
            raise UserError(f"domain classifier at {path} was trained on another world (head {h})")
    model = DomainClassifier(cfg["feature_dim"], cfg["width"])
    state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    missing = model.load_state_dict(state, strict=False)
    if missing.unexpected_keys or [k for k in missing.missing_keys if "num_batches_tracked" not in k]:
        raise UserError(f"domain classifier at {path} does not match the architecture")
    return model.eval()


# ============================================================================ training

def render_labelled(n: int, seed: int, size: int = INPUT_SIZE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rng = random.Random(seed)
    spec = WorldSpec()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = {h: np.empty(n, dtype=np.int64) for h in HEADS}
    for i in tqdm(range(n), desc="rendering", leave=False, unit="img"):
        scene = sample_scene(rng, spec)
        images[i] = np.asarray(render_scene(scene, size, random.Random(rng.random())))
        obj = scene["objects"][0]
        for h in HEADS:
            labels[h][i] = ATTRIBUTES[h].index(scene["background"] if h == "background" else obj[h])
    return torch.from_numpy(images), {h: torch.from_numpy(v) for h, v in labels.items()}


def accuracy(model: DomainClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    correct = {h: 0 for h in HEADS}
    with torch.no_grad():
        for i in range(0, len(images), 512):
            logits = model(images[i:i + 512])
            for h in HEADS:
                correct[h] += (logits[h].argmax(1) == labels[h][i:i + 512]).sum().item()
    return {h: round(correct[h] / len(images), 4) for h in HEADS}


def train_classifier(cfg: ClassifierConfig) -> dict:
    """Trains the classifier with light augmentation (blur/noise, so generated images stay in
    distribution), reports held-out accuracy per head and writes it next to the weights."""
    torch.manual_seed(cfg.seed)
    x, y = render_labelled(cfg.train_images, cfg.seed)
    xt, yt = render_labelled(cfg.test_images, cfg.seed + 1)
    model = DomainClassifier(cfg.feature_dim, cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=steps)
    t0 = time.time()
    bar = tqdm(total=steps, desc="training classifier", unit="step")
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x))
        model.train()
        for i in range(len(x) // cfg.batch_size):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            imgs = x[idx].permute(0, 3, 1, 2).float() / 255.0
            imgs = _augment(imgs)
            logits = model(imgs)
            loss = sum(F.cross_entropy(logits[h], y[h][idx]) for h in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = accuracy(model, xt, yt)
    metrics = {"held_out_accuracy": acc, "train_images": cfg.train_images, "test_images": cfg.test_images,
               "train_time_s": round(time.time() - t0, 1)}
    model.save(cfg.output_dir, metrics)
    return metrics


def _augment(imgs: torch.Tensor) -> torch.Tensor:
    """Mild blur and noise: generated images are softer and noisier than rendered ones."""
    if random.random() < 0.5:
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        imgs = F.conv2d(F.pad(imgs, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    imgs = imgs + torch.randn_like(imgs) * random.uniform(0, 0.04)
    return imgs.clamp(0, 1)
