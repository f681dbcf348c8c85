"""The synthetic captioned world: shapes, colours, positions, sizes and backgrounds.

Every image comes with a caption drawn from a small grammar and with its ground-truth attributes,
so prompt adherence can be measured exactly (``parse_caption`` reads any caption of the grammar
back into attributes). This is the project's embedded default: it needs no download.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from core.errors import UserError

SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 180), "orange": (250, 130, 10), "pink": (250, 120, 190),
    "cyan": (20, 210, 220), "brown": (120, 70, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
               "beige": (225, 205, 160)}
SIZES = {"small": 0.11, "medium": 0.16, "large": 0.21}  # half-extent as a fraction of the side
POSITIONS = {  # centre (x, y) as fractions of the side
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "centre": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
ATTRIBUTES = {"shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES),
              "position": list(POSITIONS), "background": list(BACKGROUNDS)}
_POSITION_PHRASES = {
    "top left": ["in the top left", "at the top left", "in the top left corner"],
    "top": ["at the top", "near the top"], "top right": ["in the top right", "at the top right"],
    "left": ["on the left", "at the left"], "right": ["on the right", "at the right"],
    "centre": ["in the centre", "in the middle", "in the center"],
    "bottom left": ["in the bottom left", "at the bottom left"],
    "bottom": ["at the bottom", "near the bottom"],
    "bottom right": ["in the bottom right", "at the bottom right", "in the bottom right corner"],
}
_TEMPLATES = [
    "a {size} {colour} {shape} {where} on a {bg} background",
    "{size} {colour} {shape}, {pos}, on a {bg} background",
    "a {colour} {shape} {where}",
    "a {colour} {shape} {where}, {bg} background",
    "{bg} background with a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape} {where}",
]


def concept_vocabulary() -> set[str]:
    """Every concept value the world knows (used to validate include/exclude lists)."""
    return {v for values in ATTRIBUTES.values() for v in values}


@dataclass
class WorldSpec:
    """Which concepts the generator may draw, and how often the focus concepts appear."""

    exclude: tuple[str, ...] = ()
    focus: tuple[str, ...] = ()
    focus_fraction: float = 1.0
    max_shapes: int = 1
    contrast: tuple[str, ...] = ()
    contrast_fraction: float = 0.0

    def __post_init__(self):
        unknown = (set(self.exclude) | set(self.focus) | set(self.contrast)) - concept_vocabulary()
        if unknown:
            raise UserError(f"unknown concept(s) {sorted(unknown)}; "
                            f"known: {sorted(concept_vocabulary())}")
        if set(self.exclude) & set(self.focus):
            raise UserError(f"a concept cannot be both excluded and focused: "
                            f"{sorted(set(self.exclude) & set(self.focus))}")
        if not 0.0 <= self.focus_fraction <= 1.0:
            raise UserError("focus_fraction must be between 0 and 1")
        if set(self.contrast) & (set(self.focus) | set(self.exclude)):
            raise UserError(f"contrast concepts are known ones replayed more often; these are also focused or "
                            f"excluded: {sorted(set(self.contrast) & (set(self.focus) | set(self.exclude)))}")
        if not 0.0 <= self.contrast_fraction <= 1.0 - self._focus_share() + 1e-9:  # 1 - 0.9 < 0.1 in floats
            raise UserError(f"contrast_fraction must be between 0 and 1 - focus_fraction "
                            f"({1.0 - self._focus_share():g} here)")
        if self.max_shapes < 1 or self.max_shapes > 3:
            raise UserError("max_shapes must be 1, 2 or 3")
        for attr in ("shape", "colour"):
            if not self.allowed(attr):
                raise UserError(f"every {attr} is excluded; nothing left to draw")

    def _focus_share(self) -> float:
        return self.focus_fraction if self.focus else 0.0

    def allowed(self, attr: str) -> list[str]:
        return [v for v in ATTRIBUTES[attr] if v not in self.exclude]


def sample_scene(rng: random.Random, spec: WorldSpec) -> dict:
    """Draw the attributes of one image: a background and 1..max_shapes objects."""
    u = rng.random() if spec.focus or spec.contrast else 1.0  # no draw without either: old datasets stay the same
    if spec.focus and u < spec.focus_fraction:
        steer = spec.focus
    elif spec.contrast and u < spec._focus_share() + spec.contrast_fraction:
        steer = spec.contrast
    else:
        steer = ()
    n = rng.randint(1, spec.max_shapes)
    positions = rng.sample(spec.allowed("position"), k=min(n, len(spec.allowed("position"))))
    objects = []
    for i, pos in enumerate(positions):
        obj = {"shape": rng.choice(spec.allowed("shape")), "colour": rng.choice(spec.allowed("colour")),
               "size": rng.choice(spec.allowed("size")), "position": pos}
        if i == 0 and steer:
            concept = rng.choice(list(steer))
            attr = next(a for a, vs in ATTRIBUTES.items() if concept in vs)
            if attr in obj:
                obj[attr] = concept
        objects.append(obj)
    if n > 1:  # large shapes side by side would overlap
        for obj in objects:
            obj["size"] = "small" if "small" in spec.allowed("size") else obj["size"]
    backgrounds = spec.allowed("background")
    if steer and any(c in steer for c in backgrounds):
        background = rng.choice([c for c in backgrounds if c in steer])
    else:
        background = rng.choice(backgrounds)
    return {"background": background, "objects": objects}


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.08))
        return pts
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x / 17 * r, cy - y / 17 * r + r * 0.1))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None


def render_scene(scene: dict, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draws a scene with 4x supersampling (anti-aliased edges), with a little position jitter."""
    rng = rng or random.Random(0)
    ss = 4
    side = size * ss
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        fx, fy = POSITIONS[obj["position"]]
        cx = (fx + rng.uniform(-0.035, 0.035)) * side
        cy = (fy + rng.uniform(-0.035, 0.035)) * side
        r = SIZES[obj["size"]] * side * rng.uniform(0.92, 1.08)
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            s = r * 0.88
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def caption_scene(scene: dict, rng: random.Random) -> str:
    """One caption from the grammar, in a randomly chosen phrasing."""
    parts = []
    template = rng.choice(_TEMPLATES)
    multi = len(scene["objects"]) > 1
    for i, obj in enumerate(scene["objects"]):
        where = rng.choice(_POSITION_PHRASES[obj["position"]])
        fields = dict(size=obj["size"], colour=obj["colour"], shape=obj["shape"], where=where,
                      pos=obj["position"], bg=scene["background"])
        if multi:  # keep the background once, at the end
            parts.append("a {size} {colour} {shape} {where}".format(**fields) if i else
                         template.split(" on a {bg}")[0].split(", {bg}")[0]
                         .replace("{bg} background with ", "").format(**fields))
        else:
            parts.append(template.format(**fields))
    text = " and ".join(parts)
    if multi:
        text += f", {scene['background']} background"
    return text


_BG_RE = re.compile(r"(\w+) background")


def parse_caption(text: str) -> dict:
    """Reads a caption of the grammar back into attributes.

    Returns ``{"background": str | None, "objects": [{"shape", "colour", "size", "position"}]}``;
    an attribute the caption does not mention is ``None``. Words outside the grammar are ignored.
    """
    t = " " + text.lower().replace("center", "centre").replace("middle", "centre") + " "
    background = None
    m = _BG_RE.search(t)
    if m and m.group(1) in BACKGROUNDS:
        background = m.group(1)
        t = t[:m.start()] + t[m.end():]
    objects = []
    for chunk in re.split(r"\band\b", t):
        obj = {"shape": None, "colour": None, "size": None, "position": None}
        words = re.findall(r"[a-z]+", chunk)
        for w in words:
            for attr in ("shape", "colour", "size"):
                if w in ATTRIBUTES[attr] and obj[attr] is None:
                    obj[attr] = w
        vert = next((w for w in words if w in ("top", "bottom")), None)
        horiz = next((w for w in words if w in ("left", "right")), None)
        if vert and horiz:
            obj["position"] = f"{vert} {horiz}"
        elif vert or horiz:
            obj["position"] = vert or horiz
        elif "centre" in words:
            obj["position"] = "centre"
        if obj["shape"] is not None:
            objects.append(obj)
    return {"background": background, "objects": objects}


def caption_corpus(n: int = 20000, seed: int = 12345) -> list[str]:
    """Captions over the whole world (every concept), used to train the preset tokenizer."""
    rng = random.Random(seed)
    spec = WorldSpec(max_shapes=2)
    return [caption_scene(sample_scene(rng, spec), rng) for _ in range(n)]
