"""Real-photo benchmark: can the shipped base learn real photos?

1. A captioned dataset of crops of the photos that ship inside scikit-image / scikit-learn, one
   class per photo ("a photo of a cat", ... 10 classes), written as a folder with side-car .txt
   captions. Each photo is cut into a 5 x 5 grid of tiles; 3 tiles in 5 give the fine-tune's crops,
   1 in 5 a classifier's training crops and 1 in 5 its held-out crops, so no pixel is shared.
2. A small CNN classifier trained on its crops; its accuracy on the held-out real crops is reported.
3. `t2i data check` of the dataset against the base, then `t2i train` (configs/real-photos.yaml)
   fine-tunes the base on the dataset.
4. Generations of each class's prompt (fixed seeds) by the base and the fine-tune, classified;
   accuracy per class and overall, and a before/after grid.

    python benchmarks/real_photos.py                      # writes benchmarks/results/real_photos.json
    python benchmarks/real_photos.py --quick              # a few steps, to check the plumbing
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.images import image_grid  # noqa: E402
from core.io import save_image, write_json  # noqa: E402
from core.quiet import quiet_libraries  # noqa: E402
from core.sampling import GenerationRequest, load_generator  # noqa: E402
from training.photos import packaged_photos  # noqa: E402

CLASSES = {"cat": "skimage:chelsea", "astronaut": "skimage:astronaut", "coffee": "skimage:coffee",
           "rocket": "skimage:rocket", "clock": "skimage:clock", "temple": "sklearn:china.jpg",
           "flower": "sklearn:flower.jpg", "coins": "skimage:coins", "moon": "skimage:moon",
           "cameraman": "skimage:camera"}
SIZE = 64


def prompt(cls: str) -> str:
    return f"a photo of a {cls}"


def tiles(im: np.ndarray, role: int) -> list[np.ndarray]:
    """Tiles of a 5 x 5 grid whose (row + 2 * col) % 5 is in the role's set (0: fine-tune, 1: classifier
    training, 2: classifier test)."""
    keep = {0: {0, 1, 2}, 1: {3}, 2: {4}}[role]
    h, w = im.shape[:2]
    return [im[r * h // 5:(r + 1) * h // 5, c * w // 5:(c + 1) * w // 5]
            for r in range(5) for c in range(5) if (r + 2 * c) % 5 in keep]


def crops(rng: random.Random, regions: list[np.ndarray], n: int, flip: bool = True) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        t = rng.choice(regions)
        h, w = t.shape[:2]
        s = rng.randint(min(h, w) // 2, min(h, w))
        y, x = rng.randint(0, h - s), rng.randint(0, w - s)
        pil = Image.fromarray(t[y:y + s, x:x + s]).resize((SIZE, SIZE), Image.BICUBIC)
        if flip and rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(pil))
    return out


def build_dataset(out: Path, per_class: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Writes the fine-tune folder (PNGs + side-car captions); returns the classifier's crops."""
    photos = packaged_photos()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"train": {}, "test": {}}
    for k, (cls, src) in enumerate(CLASSES.items()):
        im = photos[src]
        for i, c in enumerate(crops(rng, tiles(im, 0), per_class)):
            Image.fromarray(c).save(out / f"{cls}-{i:04d}.png")
            (out / f"{cls}-{i:04d}.txt").write_text(prompt(cls))
        sets["train"][cls] = np.stack(crops(rng, tiles(im, 1), 400))
        sets["test"][cls] = np.stack(crops(rng, tiles(im, 2), 100, flip=False))
    return sets


class PhotoClassifier(nn.Module):
    def __init__(self, n: int, w: int = 32):
        super().__init__()

        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, n)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=[2, 3]))


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def train_classifier(train: dict[str, np.ndarray], epochs: int, seed: int) -> PhotoClassifier:
    torch.manual_seed(seed)
    names = list(CLASSES)
    x = torch.cat([_x(train[c]) for c in names])
    y = torch.cat([torch.full((len(train[c]),), i) for i, c in enumerate(names)])
    model = PhotoClassifier(len(names))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            xb = x[idx]
            xb = xb + 0.1 * torch.randn(len(xb), 3, 1, 1) * torch.rand(len(xb), 1, 1, 1)  # colour jitter
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def classify(model: PhotoClassifier, images: np.ndarray) -> np.ndarray:
    return model(_x(images)).argmax(1).numpy()


def generate(model_dir: str, per_class: int, steps: int) -> dict[str, np.ndarray]:
    gen = load_generator(model_dir)
    out = {}
    for cls in CLASSES:
        reqs = [GenerationRequest(prompt(cls), num_inference_steps=steps, guidance_scale=5.0, seed=1000 + i)
                for i in range(per_class)]
        out[cls] = np.stack([ims[0] for ims in gen.generate(reqs)])
    return out


def accuracy(model: PhotoClassifier, images: dict[str, np.ndarray]) -> dict:
    names = list(CLASSES)
    per = {c: round(100 * float((classify(model, images[c]) == i).mean()), 1) for i, c in enumerate(names)}
    return {"overall": round(float(np.mean(list(per.values()))), 1), "per_class": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="models/tiny-base", help="model dir to fine-tune")
    ap.add_argument("--config", default="configs/real-photos.yaml", help="training recipe")
    ap.add_argument("--work", default="runs/real-photos", help="dataset, run and images go here")
    ap.add_argument("--per-class", type=int, default=200, help="fine-tune crops per class")
    ap.add_argument("--images", type=int, default=20, help="generations per class for the score")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--quick", action="store_true", help="a few training steps, few images")
    ap.add_argument("--out", default="benchmarks/results/real_photos.json")
    ap.add_argument("--grid", default="docs/real-photos-before-after.png")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    quiet_libraries()
    work = Path(a.work)
    data = work / "data"
    t0 = time.time()
    sets = build_dataset(data, 8 if a.quick else a.per_class, a.seed)
    clf = train_classifier(sets["train"], 2 if a.quick else 6, a.seed)
    clf_acc = accuracy(clf, sets["test"])
    print(f"classifier on held-out real crops: {clf_acc['overall']}%", flush=True)
    cli = [sys.executable, "-m", "pipeline.cli"]
    check = subprocess.run([*cli, "data", "check", str(data), "--model", a.base], capture_output=True, text=True)
    print(check.stdout, check.stderr[-2000:], flush=True)
    overrides = [f"model.pretrained={a.base}", f"data.path={data}", f"output_dir={work / 'train'}"]
    if a.quick:
        overrides += ["train.max_steps=4", "train.batch_size=8", "logging.sample_every=0", "checkpoint.every=100"]
    t_train = time.time()
    res = subprocess.run([*cli, "train", a.config, *overrides], text=True)
    if res.returncode:
        raise SystemExit(f"training failed ({res.returncode})")
    train_s = time.time() - t_train
    report = json.loads((work / "train" / "train_report.json").read_text())
    n = 2 if a.quick else a.images
    before, after = generate(a.base, n, a.steps), generate(str(work / "train" / "model"), n, a.steps)
    result = {"classes": CLASSES, "prompt": prompt("CLASS"), "fine_tune_images": len(list(data.glob("*.png"))),
              "classifier_real_held_out_accuracy": clf_acc,
              "base_generations_accuracy": accuracy(clf, before), "fine_tuned_generations_accuracy": accuracy(clf, after),
              "generations_per_class": n, "train_wall_s": round(train_s, 1), "train_steps": report["steps"],
              "vae_fit_db": (report.get("vae_fit") or {}).get("psnr_db"), "config": a.config,
              "overrides": overrides, "total_wall_s": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    grid = image_grid([before[c][0] for c in CLASSES] + [after[c][0] for c in CLASSES], cols=len(CLASSES),
                      labels=list(CLASSES) * 2)
    save_image(grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST), a.grid)
    print(json.dumps({k: result[k] for k in ("classifier_real_held_out_accuracy", "base_generations_accuracy",
                                             "fine_tuned_generations_accuracy", "train_wall_s")}, indent=1))


if __name__ == "__main__":
    main()
