"""DreamBooth-style subject example: does prior preservation keep the class word's meaning?

1. The subject: five pictures of one object of the synthetic world (a large orange triangle, at
   different places, on different backgrounds), captioned with a rare token: "a sks triangle on the
   left", written as a dataset folder with side-car .txt captions.
2. Two fine-tunes of the base on them (configs/dreambooth-example.yaml): with prior preservation
   (the base first draws images of "a triangle"; every batch trains on as many of them) and
   without (prior.class_prompt=null), same steps and seed.
3. Generations of the base and both fine-tunes, read by the domain classifier:
   - subject: "a sks triangle <where>" drawn as an orange triangle (and at the asked position);
   - the class word: "a triangle <where>" drawn orange (language drift: the base's share is the
     reference) and how far its colours moved from the base's (total variation distance);
   - the class word with a colour: "a red triangle <where>" (the seven known colours other than the
     subject's) drawn as a triangle of that colour, not the subject's;
   - everything else: shape+colour adherence on prompts of known concepts.
   Plus a grid (rows: base, without prior, with prior).

    python benchmarks/dreambooth.py             # writes benchmarks/results/dreambooth.json
    python benchmarks/dreambooth.py --quick     # a few steps, few images: checks the plumbing
    python benchmarks/dreambooth.py --set train.what=lora --set train.learning_rate=1e-3   # another recipe
    python benchmarks/dreambooth.py --set "prior.class_prompt=[a red triangle, a blue triangle]"  # other class prompts

One seed and 72 images per prompt kind: differences under about 8 points (two binomial standard
errors) are not told apart.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.images import image_grid  # noqa: E402
from core.io import save_image, write_json  # noqa: E402
from core.quiet import quiet_libraries  # noqa: E402
from core.sampling import GenerationRequest, load_generator  # noqa: E402
from synthetic.world import COLOURS, caption_corpus, parse_caption, render_scene  # noqa: E402

SUBJECT = {"shape": "triangle", "colour": "orange", "size": "large"}
TOKEN = "sks"
PLACES = {"top left": "in the top left", "right": "on the right", "bottom": "at the bottom",
          "centre": "in the centre", "left": "on the left"}
BACKGROUNDS = ["white", "black", "gray", "beige", "white"]
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
         "left": "on the left", "centre": "in the centre", "right": "on the right",
         "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}


def write_subject(out: Path, seed: int) -> None:
    """Five pictures of the subject with side-car captions "a sks triangle <where>"."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, ((pos, phrase), bg) in enumerate(zip(PLACES.items(), BACKGROUNDS)):
        scene = {"background": bg, "objects": [{**SUBJECT, "position": pos}]}
        render_scene(scene, 64, random.Random(rng.random())).save(out / f"subject-{i}.png")
        (out / f"subject-{i}.txt").write_text(f"a {TOKEN} {SUBJECT['shape']} {phrase}")


def prompts(kind: str, per_place: int) -> list[tuple[str, str | None]]:
    """(prompt, asked position) pairs: the subject's or the class word's prompt at the nine places."""
    word = f"a {TOKEN} {SUBJECT['shape']}" if kind == "subject" else f"a {SUBJECT['shape']}"
    return [(f"{word} {phrase}", pos) for pos, phrase in WHERE.items() for _ in range(per_place)]


OTHER_COLOURS = [c for c in COLOURS if c not in (SUBJECT["colour"], "purple")]  # the base's, not the subject's


def coloured_prompts(per_place: int) -> list[tuple[str, str]]:
    """(prompt, asked colour) pairs: the class word with each other known colour in turn, at the nine places."""
    out = []
    for k, phrase in enumerate(p for p in WHERE.values() for _ in range(per_place)):
        colour = OTHER_COLOURS[k % len(OTHER_COLOURS)]
        out.append((f"a {colour} {SUBJECT['shape']} {phrase}", colour))
    return out


def known_prompts(n: int) -> list[str]:
    """Prompts of concepts the base knows (one object with a shape and a colour)."""
    out = []
    for c in caption_corpus(4000, seed=7):
        p = parse_caption(c)
        if len(p["objects"]) == 1 and p["objects"][0]["colour"] and p["objects"][0]["shape"] not in ("star", "heart") \
                and p["objects"][0]["colour"] != "purple":
            out.append(c)
        if len(out) == n:
            break
    return out


def generate(model_dir: str, texts: list[str], steps: int) -> np.ndarray:
    gen = load_generator(model_dir)
    reqs = [GenerationRequest(t, num_inference_steps=steps, guidance_scale=5.0, seed=2000 + i)
            for i, t in enumerate(texts)]
    out = []
    for k in range(0, len(reqs), 32):
        out += [ims[0] for ims in gen.generate(reqs[k:k + 32])]
    return np.stack(out)


def score(model_dir: str, clf, per_place: int, n_known: int, steps: int) -> tuple[dict, dict]:
    subj, cls, known = prompts("subject", per_place), prompts("class", per_place), known_prompts(n_known)
    coloured = coloured_prompts(per_place)
    images = {name: generate(model_dir, [t for t, *_ in ps] if name != "known" else ps, steps)
              for name, ps in (("subject", subj), ("class", cls), ("known", known), ("coloured", coloured))}
    pred = {name: clf.predict(torch.from_numpy(im)) for name, im in images.items()}

    def pct(xs) -> float:
        return round(100 * float(np.mean(xs)), 1)

    s, c = pred["subject"], pred["class"]
    result = {
        "subject_shape_and_colour": pct([sh == SUBJECT["shape"] and co == SUBJECT["colour"]
                                         for sh, co in zip(s["shape"], s["colour"])]),
        "subject_position": pct([po == want for po, (_, want) in zip(s["position"], subj)]),
        "class_shape": pct([sh == SUBJECT["shape"] for sh in c["shape"]]),
        "class_drawn_in_subject_colour": pct([co == SUBJECT["colour"] for co in c["colour"]]),
        "class_colours": dict(Counter(c["colour"]).most_common()),
        "class_position": pct([po == want for po, (_, want) in zip(c["position"], cls)]),
        "coloured_class_shape_and_colour": pct([
            sh == SUBJECT["shape"] and co == want
            for sh, co, (_, want) in zip(pred["coloured"]["shape"], pred["coloured"]["colour"], coloured)]),
        "coloured_class_drawn_in_subject_colour": pct([co == SUBJECT["colour"] for co in pred["coloured"]["colour"]]),
        "known_shape_and_colour": pct([
            sh == parse_caption(t)["objects"][0]["shape"] and co == parse_caption(t)["objects"][0]["colour"]
            for sh, co, t in zip(pred["known"]["shape"], pred["known"]["colour"], known)]),
        "images": {k: len(v) for k, v in images.items()}}
    return result, images


def total_variation(a: dict[str, int], b: dict[str, int]) -> float:
    """Total variation distance between two colour counts, in percent."""
    na, nb = sum(a.values()), sum(b.values())
    return round(50 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b)), 1)


def train(cli: list[str], config: str, out: Path, extra: list[str]) -> tuple[float, dict]:
    t0 = time.time()
    res = subprocess.run([*cli, "train", config, f"output_dir={out}", *extra], text=True)
    if res.returncode:
        raise SystemExit(f"training failed ({res.returncode})")
    return time.time() - t0, json.loads((out / "train_report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="models/tiny-base", help="model dir to fine-tune")
    ap.add_argument("--config", default="configs/dreambooth-example.yaml", help="training recipe")
    ap.add_argument("--work", default="runs/dreambooth", help="data, runs and class images go here")
    ap.add_argument("--per-place", type=int, default=8, help="generations per position for each prompt kind")
    ap.add_argument("--known", type=int, default=96, help="prompts of known concepts")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--quick", action="store_true", help="a few training steps, few images")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/dreambooth.json (--quick: in --work)")
    ap.add_argument("--grid", default=None, help="default: docs/dreambooth-grid.png (--quick: in --work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training override for both runs (repeatable), e.g. train.learning_rate=3e-5")
    a = ap.parse_args()
    quiet_libraries()
    from evaluation.classifier import load_classifier

    work = Path(a.work)
    a.out = a.out or str(work / "dreambooth.json" if a.quick else "benchmarks/results/dreambooth.json")
    a.grid = a.grid or str(work / "dreambooth-grid.png" if a.quick else "docs/dreambooth-grid.png")
    t0 = time.time()
    write_subject(work / "subject", a.seed)
    cli = [sys.executable, "-m", "pipeline.cli"]
    common = [f"model.pretrained={a.base}", f"data.path={work / 'subject'}", f"prior.dir={work / 'class_images'}",
              *a.set]
    if a.quick:
        common += ["train.max_steps=4", "prior.num_images=8", "prior.steps=4", "logging.final_samples=false"]
        a.per_place, a.known, a.steps = 1, 8, 4
    runs = {"without prior": (work / "no-prior", ["prior.class_prompt=null"]), "with prior": (work / "prior", [])}
    walls, reports = {}, {}
    for name, (out, extra) in runs.items():
        walls[name], reports[name] = train(cli, a.config, out, common + extra)
    clf = load_classifier()
    scores, images = {}, {}
    for name, model in [("base", a.base)] + [(n, str(out / "model")) for n, (out, _) in runs.items()]:
        scores[name], images[name] = score(model, clf, a.per_place, a.known, a.steps)
        # how far "a triangle"'s colours moved from the base's: total variation distance, 0 (same) to 100 (disjoint)
        scores[name]["class_colour_shift_from_base"] = total_variation(scores[name]["class_colours"],
                                                                       scores["base"]["class_colours"])
        print(name, json.dumps({k: v for k, v in scores[name].items() if k != "images"}), flush=True)
    result = {"subject": SUBJECT, "token": TOKEN, "subject_images": len(PLACES), "scores": scores,
              "train_wall_s": {k: round(v, 1) for k, v in walls.items()},  # the command: start-up, drawing, saving
              "train_loop_s": {k: r["wall_time_s"] for k, r in reports.items()},
              "train_steps": {k: r["steps"] for k, r in reports.items()},
              "class_images": reports["with prior"].get("class_images"), "config": a.config,
              "overrides": common, "sampling_steps": a.steps, "total_wall_s": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    # columns: the subject at three places, the class word at three, two known prompts
    per = a.per_place
    pick = [("subject", 0), ("subject", 4 * per), ("subject", 7 * per), ("class", 0), ("class", 4 * per),
            ("class", 7 * per), ("known", 0), ("known", 1)]
    rows = [images[name][kind][i] for name in images for kind, i in pick]
    cols = ["sksTL", "sksC", "sksB", "triTL", "triC", "triB", "known", "known"]
    labels = [f"{row} {col}" for row in ("base", "-pri", "+pri") for col in cols]  # 64 px: 10 characters
    grid = image_grid(rows, cols=len(pick), labels=labels)
    save_image(grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST), a.grid)


if __name__ == "__main__":
    main()
