"""``t2i eval``: FID, prompt adherence, Inception Score and (optional) CLIP score of a model, and
the before/after comparison of a fine-tune against its base (learning vs forgetting).

Scoring works on arrays of images, so export can score any variant's images with the same code
(``score_images``); ``evaluate`` and ``compare`` add generation from model dirs around it.
"""
from __future__ import annotations

import hashlib
import json
import io
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from synthetic.world import ATTRIBUTES, WorldSpec, caption_scene, parse_caption, render_scene, sample_scene
from core.errors import UserError
from core.config import ReferenceData
from evaluation.config import EvalConfig
from core.images import image_grid
from core.io import atomic_write, dir_digest, write_json

ADHERENCE_ATTRS = ("shape", "colour", "position")


# ============================================================================ prompt set

def prompt_set(cfg: EvalConfig, captions: list[str] | None = None) -> list[dict]:
    """[{prompt, scene, split}], deterministic from the seed: the prompts file's lines, else a seeded
    sample of ``captions`` (a references dataset's), else a fixed set drawn from the caption grammar.
    ``scene`` is None for free prompts and for captions (their references are the dataset's images)."""
    rng = random.Random(cfg.seed)
    new = tuple(cfg.new_concepts)
    if captions and not cfg.prompts:
        pool = list(captions)
        rng.shuffle(pool)
        pool = (pool * (cfg.num_images // len(pool) + 1))[:cfg.num_images]
        # a caption that happens to name a shape and a colour is still not the world's: never scored
        return [{"prompt": t, "scene": None, "split": _split(t, new), "scored": False} for t in pool]
    if cfg.prompts:
        p = Path(cfg.prompts)
        if not p.is_file():
            raise UserError(f"prompts file {cfg.prompts} does not exist")
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not lines:
            raise UserError(f"prompts file {cfg.prompts} is empty")
        lines = (lines * (cfg.num_images // len(lines) + 1))[:cfg.num_images]
        return [{"prompt": t, "scene": _scene_from_prompt(t, rng), "split": _split(t, new)} for t in lines]
    if new:
        specs = [("known", WorldSpec(exclude=new)), ("new", WorldSpec(focus=new))]
    else:
        specs = [("all", WorldSpec())]
    out = []
    for i in range(cfg.num_images):
        split, spec = specs[i % len(specs)]
        scene = sample_scene(rng, spec)
        out.append({"prompt": caption_scene(scene, rng), "scene": scene, "split": split})
    return out


def _split(text: str, new: tuple) -> str:
    if not new:
        return "all"
    words = set(text.lower().replace(",", " ").split())
    return "new" if words & set(new) else "known"


def _scene_from_prompt(text: str, rng: random.Random) -> dict | None:
    """Completes a parsed prompt's unmentioned attributes at random (for the reference image)."""
    parsed = parse_caption(text)
    if len(parsed["objects"]) != 1:
        return None
    obj = {a: v or rng.choice(ATTRIBUTES[a]) for a, v in parsed["objects"][0].items()}
    bg = parsed["background"] or rng.choice([b for b in ATTRIBUTES["background"]])
    return {"background": bg, "objects": [obj]}


def reference_captions(refs: ReferenceData) -> list[str]:
    """The references dataset's captions, its images not decoded yet: a missing or uncaptioned dataset
    fails here, before anything is generated."""
    from core.datasets import dataset_captions

    captions = dataset_captions(refs.path, refs.image_column, refs.caption_column)
    if not captions:
        raise UserError(f"references dataset {refs.path} has no rows")
    return captions


def dataset_references(refs: ReferenceData, size: int) -> np.ndarray:
    """The references dataset's images (uint8 NHWC) at ``size``, decoded and cropped as training does
    (at most ``refs.max_images``); FID needs at least two."""
    from core.datasets import load_imagefolder

    pixels = load_imagefolder(refs.path, size, image_column=refs.image_column,
                              caption_column=refs.caption_column, max_rows=refs.max_images).pixels
    if len(pixels) < 2:
        raise UserError(f"references dataset {refs.path} has {len(pixels)} decodable image; FID needs at least 2")
    return pixels


def scored_prompts(items: list[dict]) -> list[str]:
    """The prompts adherence reads: a references dataset's captions blanked (never scored)."""
    return [it["prompt"] if it.get("scored", True) else "" for it in items]


def _references_up_front(cfg: EvalConfig, model: str) -> np.ndarray | None:
    """The references dataset decoded at a local model's native size before anything is generated, so a
    bad dataset costs nothing; None without references or for a hub model (decoded after generation)."""
    from core.models import model_meta

    if not cfg.references or not Path(model).is_dir():
        return None
    return dataset_references(cfg.references, model_meta(Path(model))["native_size"])


def reference_images(items: list[dict], seed: int, size: int = 64, per_prompt: int = 1) -> np.ndarray:
    """Real images of the prompts' own scenes (fresh jitter): FID compares like with like.

    ``per_prompt`` blocks, each one image per prompt with a scene, in the order of ``items``.
    """
    rng = random.Random(seed + 7919)
    imgs = [np.asarray(render_scene(it["scene"], size, random.Random(rng.random())))
            for _ in range(per_prompt) for it in items if it["scene"] is not None]
    return np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)


# ============================================================================ scoring

def adherence(images: np.ndarray, prompts: list[str], classifier) -> dict:
    """Share of images whose classified attributes match what the prompt asks for.

    Per attribute (only prompts that mention it count), ``shape+colour`` and ``all``
    (shape, colour and position all right). Prompts outside the grammar are left out.
    """
    pred = classifier.predict(torch.from_numpy(images))
    hits = {a: [] for a in (*ADHERENCE_ATTRS, "size", "background", "shape+colour", "all")}
    for i, text in enumerate(prompts):
        parsed = parse_caption(text)
        if len(parsed["objects"]) != 1:
            continue
        want = {**parsed["objects"][0], "background": parsed["background"]}
        ok = {a: pred[a][i] == want[a] for a in want if want[a] is not None}
        for a, v in ok.items():
            hits[a].append(v)
        if all(want[a] for a in ("shape", "colour")):
            hits["shape+colour"].append(ok["shape"] and ok["colour"])
        if all(want[a] for a in ADHERENCE_ATTRS):
            hits["all"].append(all(ok[a] for a in ADHERENCE_ATTRS))
    return {a: round(100 * float(np.mean(v)), 1) if v else None for a, v in hits.items()} | \
        {"n": len(hits["shape+colour"])}


def adherence_hits(images: np.ndarray, prompts: list[str], classifier) -> np.ndarray:
    """Per image, what ``adherence(...)["shape+colour"]`` averages: 1.0 when shape and colour are
    right, 0.0 when not, NaN when the prompt is not scored (not one object with shape and colour)."""
    pred = classifier.predict(torch.from_numpy(images))
    out = np.full(len(prompts), np.nan)
    for i, text in enumerate(prompts):
        parsed = parse_caption(text)
        if len(parsed["objects"]) == 1 and all(parsed["objects"][0][a] for a in ("shape", "colour")):
            want = parsed["objects"][0]
            out[i] = float(pred["shape"][i] == want["shape"] and pred["colour"][i] == want["colour"])
    return out


def inception_score(images: np.ndarray, classifier) -> dict:
    """Inception Score (Salimans et al. 2016) over the domain classifier's shape and colour heads."""
    from torchmetrics.image.inception import InceptionScore

    out = {}
    for head in ("shape", "colour"):
        class Head(torch.nn.Module):
            def forward(self, x, head=head):
                with torch.no_grad():
                    return classifier(x.permute(0, 2, 3, 1).contiguous())[head]
        with warnings.catch_warnings():  # torchmetrics' notes on its feature buffer and, with one split,
            warnings.filterwarnings("ignore", message=".*(extracted features in buffer|degrees of freedom)")
            metric = InceptionScore(feature=Head(), splits=1)  # the std over one split: not reported
            metric.update(torch.from_numpy(images).permute(0, 3, 1, 2))
            out[head] = round(float(metric.compute()[0]), 3)
    return out


def clip_score(images: np.ndarray, prompts: list[str], clip_model: str | None) -> dict:
    if not clip_model:
        return {"skipped": "no local CLIP model given (set clip_model to a local CLIP dir to compute it)"}
    if not Path(clip_model).exists():
        return {"skipped": f"CLIP model {clip_model} not found locally"}
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=clip_model)
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2), prompts)
    return {"score": round(float(metric.compute()), 3)}


def score_images(images: np.ndarray, items: list[dict], cfg: EvalConfig, classifier=None,
                 reference: np.ndarray | None = None) -> dict:
    """All metrics for generated ``images`` (uint8 NHWC) of ``items``, overall and per split.

    ``reference``: real images, as ``reference_images`` lays them out (made here when not given), or,
    with ``cfg.references``, the dataset's images, which every split is measured against.
    """
    from evaluation.classifier import load_classifier
    from evaluation.fid import fid, resolve_features

    classifier = classifier or load_classifier()
    kind = resolve_features(cfg.features)
    prompts = scored_prompts(items)  # what adherence reads
    ref = reference if reference is not None else \
        reference_images(items, cfg.seed, per_prompt=cfg.reference_per_prompt)
    # renders come in blocks of one per scene, so each split has its own; a dataset's images serve all
    scene_splits = [] if cfg.references else [it["split"] for it in items if it["scene"] is not None]
    blocks = len(ref) // max(1, len(scene_splits))
    if scene_splits and blocks * len(scene_splits) != len(ref):
        raise ValueError(f"reference holds {len(ref)} images, not a multiple of the {len(scene_splits)} scenes")
    splits = sorted({it["split"] for it in items})
    report = {"features": kind, "num_images": len(images), "reference_images": len(ref), "splits": {}}
    for split in splits:
        idx = [i for i, it in enumerate(items) if it["split"] == split]
        ridx = list(range(len(ref))) if cfg.references else \
            [b * len(scene_splits) + j for b in range(blocks) for j, sp in enumerate(scene_splits) if sp == split]
        entry = {"n": len(idx), "adherence": adherence(images[idx], [prompts[i] for i in idx], classifier)}
        if len(idx) >= 2 and len(ridx) >= 2:
            entry["fid"] = round(fid(images[idx], ref[ridx], kind, classifier), 3)
        report["splits"][split] = entry
    report["adherence"] = adherence(images, prompts, classifier)
    if len(ref) >= 2:
        report["fid"] = round(fid(images, ref, kind, classifier), 3)
    report["inception_score"] = inception_score(images, classifier)
    report["clip_score"] = clip_score(images, [it["prompt"] for it in items], cfg.clip_model)
    return report


# ============================================================================ generation

def generate_images(model: str, items: list[dict], cfg: EvalConfig, desc: str = "generating") -> np.ndarray:
    """One image per item (uint8 NHWC), item i with seed cfg.seed + i, through the one sampling engine."""
    from tqdm.auto import tqdm

    from core.sampling import SCHEDULERS, GenerationRequest, load_generator

    if cfg.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {cfg.scheduler!r}; choose from {sorted(SCHEDULERS)}")
    from core.models import default_device

    gen = load_generator(model, cfg.scheduler, device=cfg.device or default_device())
    out = []
    for i in tqdm(range(0, len(items), cfg.batch_size), desc=desc, unit="batch", leave=False):
        chunk = items[i:i + cfg.batch_size]
        reqs = [GenerationRequest(it["prompt"], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                                  seed=cfg.seed + i + j) for j, it in enumerate(chunk)]
        out += [imgs[0] for imgs in gen.generate(reqs)]
    return np.stack(out)


_IMAGE_CACHE_VERSION = 2  # bump when generate_images or the sampling engine changes what they draw


def generate_cached(model: str, items: list[dict], cfg: EvalConfig, desc: str) -> tuple[np.ndarray, bool]:
    """``generate_images``, kept on disk under a key of the model's files, the prompts and the sampling settings.

    A base model is evaluated again by every fine-tune of it; the second time its images load in a second.
    Any change to the model's files or the settings gives a new key, so a stale set is never used.
    Returns (images, whether they came from the cache). Hub ids (not a local dir) are not cached.
    """
    from evaluation.fid import cache_dir

    root = Path(model)
    if not root.is_dir():
        return generate_images(model, items, cfg, desc), False
    import diffusers

    h = hashlib.sha256(dir_digest(root).encode())
    # the libraries and this module's generation code decide the pixels too
    h.update(json.dumps([_IMAGE_CACHE_VERSION, diffusers.__version__, torch.__version__,
                         [it["prompt"] for it in items], cfg.steps, cfg.guidance, cfg.scheduler, cfg.seed,
                         cfg.batch_size]).encode())
    path = cache_dir().parent / "eval-images" / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        images = np.load(path)
        if len(images) == len(items):
            return images, True
    images = generate_images(model, items, cfg, desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, images)
    atomic_write(path, buf.getvalue())
    return images, False


def evaluate(model: str, out_dir: str, cfg: EvalConfig) -> dict:
    """Generates the prompt set with ``model``, scores it, writes eval.json + samples.png."""
    t0 = time.time()
    items = prompt_set(cfg, reference_captions(cfg.references) if cfg.references else None)
    ref = _references_up_front(cfg, model)
    images = generate_images(model, items, cfg)
    if cfg.references and ref is None:
        ref = dataset_references(cfg.references, images.shape[1])
    report = {"model": str(model), "config": cfg.model_dump(), **score_images(images, items, cfg, reference=ref)}
    report["wall_time_s"] = round(time.time() - t0, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _grid(images[:16], [it["prompt"] for it in items[:16]]).save(out / "samples.png")
    write_json(out / "eval.json", report)
    return report


def compare(model: str, base: str, out_dir: str, cfg: EvalConfig) -> dict:
    """Evaluates ``base`` and ``model`` on the same prompts and seeds; known vs new concepts."""
    t0 = time.time()
    items = prompt_set(cfg, reference_captions(cfg.references) if cfg.references else None)
    ref = _references_up_front(cfg, model)
    after = generate_images(model, items, cfg, "generating (model)")
    before, base_cached = generate_cached(base, items, cfg, "generating (base)")
    from evaluation.classifier import load_classifier

    clf = load_classifier()
    if ref is None:
        ref = dataset_references(cfg.references, after.shape[1]) if cfg.references else \
            reference_images(items, cfg.seed, per_prompt=cfg.reference_per_prompt)
    r_after, r_before = score_images(after, items, cfg, clf, ref), score_images(before, items, cfg, clf, ref)
    table = {}
    for split in r_after["splits"]:
        a, b = r_after["splits"][split], r_before["splits"][split]
        table[split] = {
            "adherence_before": b["adherence"]["shape+colour"], "adherence_after": a["adherence"]["shape+colour"],
            "adherence_all_before": b["adherence"]["all"], "adherence_all_after": a["adherence"]["all"],
            "fid_before": b.get("fid"), "fid_after": a.get("fid"),
        }
        if b.get("fid"):
            table[split]["fid_change_pct"] = round(100 * (a["fid"] - b["fid"]) / b["fid"], 1)
    report = {"model": str(model), "base": str(base), "new_concepts": cfg.new_concepts, "features": r_after["features"],
              "summary": table, "model_eval": r_after, "base_eval": r_before, "base_images_cached": base_cached,
              "wall_time_s": round(time.time() - t0, 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    new_idx = [i for i, it in enumerate(items) if it["split"] == "new"][:8] or list(range(min(8, len(items))))
    _before_after_grid(before[new_idx], after[new_idx], [items[i]["prompt"] for i in new_idx]).save(
        out / "before_after.png")
    write_json(out / "compare.json", report)
    return report


def _grid(images: np.ndarray, labels: list[str]):
    return image_grid(list(images), cols=min(8, len(images)))


def _before_after_grid(before: np.ndarray, after: np.ndarray, prompts: list[str]):
    """Row 1: base, row 2: fine-tuned, same prompt and seed per column."""
    return image_grid(list(before) + list(after), cols=len(before))


def format_table(report: dict) -> str:
    """A small text table of a compare or eval report."""
    if "summary" in report:
        rows = ["split   adh.before  adh.after  FID before  FID after  FID change"]
        for split, r in report["summary"].items():
            rows.append(f"{split:7s} {_f(r['adherence_before']):>10s} {_f(r['adherence_after']):>10s} "
                        f"{_f(r['fid_before']):>11s} {_f(r['fid_after']):>10s} {_f(r.get('fid_change_pct'), '%'):>11s}")
        return "\n".join(rows) + f"\n(adherence = shape+colour correct, %; FID features: {report['features']})"
    rows = ["split   n     shape  colour  position  shape+colour  all    FID"]
    for split, r in report["splits"].items():
        a = r["adherence"]
        rows.append(f"{split:7s} {r['n']:<5d} {_f(a['shape']):>5s} {_f(a['colour']):>7s} {_f(a['position']):>9s} "
                    f"{_f(a['shape+colour']):>13s} {_f(a['all']):>5s} {_f(r.get('fid')):>7s}")
    return "\n".join(rows) + f"\n(adherence in %; FID features: {report['features']})"


def _f(v, suffix="") -> str:
    return "-" if v is None else (f"{v:.1f}{suffix}" if isinstance(v, float) else f"{v}{suffix}")
