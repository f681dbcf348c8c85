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
from core.errors import UserError
from core.io import atomic_dir, write_json
from training.config import TrainConfig

SPEC_FILE = "prior.json"
DRAW_BATCH = 16
"""Class images drawn per sampler call."""


def class_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.prior.dir) if cfg.prior.dir else Path(cfg.output_dir) / "class_images"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def _model_fingerprint(path: str | None) -> list:
    """A local model's weight files (name, size, mtime); a hub id's name (its revision is not checked)."""
    if path is None:
        return []
    root = Path(path)
    if not root.is_dir():
        return [path]
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(root.rglob("*")) if f.suffix in WEIGHT_SUFFIXES]


def spec(cfg: TrainConfig, resolution: int) -> dict:
    """What the class images depend on: a folder drawn with another spec is drawn again."""
    p, prompts = cfg.prior, cfg.prior.prompts()
    return {"model": cfg.model.pretrained, "weights": _model_fingerprint(cfg.model.pretrained),
            "vae": cfg.model.vae, "vae_weights": _model_fingerprint(cfg.model.vae),
            "prompt": prompts[0] if len(prompts) == 1 else prompts,  # ["a cat"] draws what "a cat" does
            "num_images": p.num_images, "steps": p.steps, "guidance": p.guidance, "resolution": resolution}


def _matches(folder: Path, want: dict) -> bool:
    """The folder was drawn with these settings and still holds every image."""
    try:
        same = json.loads((folder / SPEC_FILE).read_text()) == json.loads(json.dumps(want))
    except (OSError, ValueError):
        return False
    return same and all((folder / _name(i)).is_file() for i in range(want["num_images"]))


def _name(i: int) -> str:
    return f"class-{i:05d}.png"


def check_folder(cfg: TrainConfig) -> Path:
    """The class folder, refused when drawing would replace something that is not ours: a folder without
    prior.json that holds files (the user's own class photos, say), or the training data itself."""
    folder = class_dir(cfg)
    if folder.resolve() == Path(cfg.data.path).resolve():
        raise UserError(f"prior.dir is the training data folder ({cfg.data.path}): the class images need a "
                        "folder of their own")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SPEC_FILE).exists():
        raise UserError(f"prior.dir {folder} holds files that t2i did not draw (no {SPEC_FILE}); drawing the "
                        "class images would replace them: give prior.dir an empty or new folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"prior.dir {folder} is a file, not a folder")
    return folder


@torch.no_grad()
def draw(comps, cfg: TrainConfig, resolution: int, folder: Path, device) -> None:
    """Draws prior.num_images images of the class prompts (image i of prompt i mod their count, seed i)
    with the model as loaded (its own scheduler: before a fine-tune changes its prediction type or
    schedule) into ``folder``, atomically."""
    from core.sampling import GenerationRequest, generator_from_parts

    p = cfg.prior
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # the sampler turns TF32 on
    gen = generator_from_parts(comps.text_encoder, comps.unet, comps.vae, comps.tokenizer, comps.sampler_config(),
                               device=device)
    prompts = p.prompts()
    reqs = [GenerationRequest(prompts[i % len(prompts)], num_inference_steps=p.steps, guidance_scale=p.guidance, seed=i,
                              width=resolution, height=resolution) for i in range(p.num_images)]
    try:
        _draw_into(gen, reqs, cfg, resolution, folder)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _draw_into(gen, reqs, cfg: TrainConfig, resolution: int, folder: Path) -> None:
    with atomic_dir(folder) as tmp:
        rows = []
        with tqdm(total=len(reqs), desc="drawing class images", unit="img") as bar:
            for start in range(0, len(reqs), DRAW_BATCH):
                for i, imgs in enumerate(gen.generate(reqs[start:start + DRAW_BATCH]), start):
                    name = _name(i)
                    Image.fromarray(np.asarray(imgs[0])).save(tmp / name)
                    rows.append({"file_name": name, "text": reqs[i].prompt})
                    bar.update(1)
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_json(tmp / SPEC_FILE, spec(cfg, resolution))


def class_images(comps, cfg: TrainConfig, resolution: int, device, is_main: bool, say=print) -> LoadedImages:
    """The class images of prior.class_prompt, drawn by the model (``comps``, as loaded) unless a folder
    drawn with the same settings exists.

    Only the main process draws (the caller runs it first); the others read its folder. The global
    random state is left as it was, so a run draws the same training noise whether or not the images
    were drawn in it.
    """
    folder = check_folder(cfg)
    want = spec(cfg, resolution)
    if _matches(folder, want):
        say(f"prior preservation: reusing {cfg.prior.num_images} class images in {folder}")
    elif is_main:
        prompts = cfg.prior.prompts()
        what = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} class prompts"
        say(f"prior preservation: drawing {cfg.prior.num_images} images of {what} into {folder}")
        with torch.random.fork_rng(devices=[]):
            draw(comps, cfg, resolution, folder, device)
    images = load_imagefolder(str(folder), resolution, on_bad_image="error")
    if len(images.captions) != cfg.prior.num_images:
        raise UserError(f"prior.dir {folder} holds {len(images.captions)} class images, not prior.num_images="
                        f"{cfg.prior.num_images}: delete the folder to draw them again")
    return images


def merged(instance: LoadedImages, cls: LoadedImages) -> LoadedImages:
    """The user's images followed by the class images (indices >= len(instance) are class images)."""
    return LoadedImages(np.concatenate([instance.pixels, cls.pixels]), instance.captions + cls.captions,
                        instance.skipped, instance.rows + cls.rows, instance.sizes + cls.sizes)
