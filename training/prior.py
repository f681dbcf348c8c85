"""DreamBooth's prior preservation (Ruiz et al. 2023): before a subject fine-tune, the model draws
images of the subject's class ("a photo of a cat"), and every batch trains on as many of them as of
the user's photos ("a photo of sks cat"), so the class word keeps its meaning while the rare token
learns the subject.

The class images are a dataset folder like any other (PNGs + ``metadata.jsonl``) plus ``prior.json``,
the settings they were drawn with: a later run (or a resumed one) with the same model and settings
reuses them instead of drawing them again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from core.datasets import LoadedImages, load_imagefolder
from core.io import atomic_dir, write_json
from training.config import TrainConfig

SPEC_FILE = "prior.json"
DRAW_BATCH = 16
"""Class images drawn per sampler call."""


def class_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.prior.dir) if cfg.prior.dir else Path(cfg.output_dir) / "class_images"


def _model_fingerprint(pretrained: str) -> list:
    """The model's weight files (name, size, mtime) when it is a local folder; its name otherwise."""
    root = Path(pretrained)
    if not root.is_dir():
        return [pretrained]
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(root.rglob("*.safetensors"))]


def spec(cfg: TrainConfig, resolution: int) -> dict:
    """What the class images depend on: a folder drawn with another spec is drawn again."""
    p = cfg.prior
    return {"model": cfg.model.pretrained, "weights": _model_fingerprint(cfg.model.pretrained),
            "vae": cfg.model.vae, "prompt": p.class_prompt, "num_images": p.num_images, "steps": p.steps,
            "guidance": p.guidance, "resolution": resolution,
            "prediction_type": cfg.train.prediction_type, "zero_terminal_snr": cfg.train.zero_terminal_snr}


def _matches(folder: Path, want: dict) -> bool:
    try:
        return json.loads((folder / SPEC_FILE).read_text()) == json.loads(json.dumps(want))
    except (OSError, ValueError):
        return False


@torch.no_grad()
def draw(model, cfg: TrainConfig, resolution: int, folder: Path, show: bool = True) -> None:
    """Draws prior.num_images images of prior.class_prompt (seeds 0..n-1) into ``folder``, atomically."""
    from core.sampling import GenerationRequest

    p = cfg.prior
    gen = model.generator()
    reqs = [GenerationRequest(p.class_prompt, num_inference_steps=p.steps, guidance_scale=p.guidance, seed=i,
                              width=resolution, height=resolution) for i in range(p.num_images)]
    with atomic_dir(folder) as tmp:
        rows = []
        with tqdm(total=len(reqs), desc="drawing class images", unit="img", disable=not show) as bar:
            for start in range(0, len(reqs), DRAW_BATCH):
                for i, imgs in enumerate(gen.generate(reqs[start:start + DRAW_BATCH]), start):
                    name = f"class-{i:05d}.png"
                    Image.fromarray(np.asarray(imgs[0])).save(tmp / name)
                    rows.append({"file_name": name, "text": p.class_prompt})
                    bar.update(1)
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_json(tmp / SPEC_FILE, spec(cfg, resolution))


def class_images(model, cfg: TrainConfig, resolution: int, is_main: bool, say=print) -> LoadedImages:
    """The class images of prior.class_prompt, drawn by ``model`` unless a matching folder exists.

    Only the main process draws (the caller runs it first); the others read its folder. The global
    random state is left as it was, so a run draws the same training noise whether or not the images
    were drawn in it.
    """
    folder = class_dir(cfg)
    want = spec(cfg, resolution)
    if _matches(folder, want):
        say(f"prior preservation: reusing {cfg.prior.num_images} class images in {folder}")
    elif is_main:
        say(f"prior preservation: drawing {cfg.prior.num_images} images of {cfg.prior.class_prompt!r} "
            f"into {folder}")
        with torch.random.fork_rng(devices=[]):
            draw(model, cfg, resolution, folder)
    return load_imagefolder(str(folder), resolution)


def merged(instance: LoadedImages, cls: LoadedImages) -> LoadedImages:
    """The user's images followed by the class images (indices >= len(instance) are class images)."""
    return LoadedImages(np.concatenate([instance.pixels, cls.pixels]), instance.captions + cls.captions,
                        instance.skipped, instance.rows + cls.rows, instance.sizes + cls.sizes)
