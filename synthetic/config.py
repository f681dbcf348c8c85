"""Configs of the synthetic world (``t2i data shapes``, and ``data.synthetic`` of a training config)."""
from __future__ import annotations

from pydantic import Field

from core.config import Strict


class WorldConfig(Strict):
    """What to render: how many images, which concepts, how often."""

    n: int = Field(2000, ge=1)
    """Number of images to render."""
    seed: int = 0
    """Seed of the generator (same seed, same images)."""
    size: int = Field(64, ge=16, multiple_of=16)
    """Image side in pixels (a multiple of 16)."""
    exclude: list[str] = []
    """Concepts never drawn (e.g. [star, heart, purple] for a base model)."""
    focus: list[str] = []
    """Concepts each image is steered towards (for a fine-tune that teaches them)."""
    focus_fraction: float = Field(1.0, ge=0, le=1)
    """Share of images that contain a focus concept; the rest replay the whole world."""
    contrast: list[str] = []
    """Known concepts to replay more often: the nearest ones to the focus concepts, which a fine-tune tends
    to draw the new concept for (pink drawn purple, a cross drawn as a star). Their images teach where the
    new concept ends."""
    contrast_fraction: float = Field(0.0, ge=0, le=1)
    """Share of images that contain a contrast concept (taken from the replay; at most 1 - focus_fraction)."""
    max_shapes: int = Field(1, ge=1, le=3)
    """Up to this many shapes per image."""

    def spec(self):
        """The generator's WorldSpec for these settings."""
        from synthetic.world import WorldSpec

        return WorldSpec(tuple(self.exclude), tuple(self.focus), self.focus_fraction, self.max_shapes,
                         tuple(self.contrast), self.contrast_fraction)


class ShapesConfig(WorldConfig):
    """``t2i data shapes``: render the world as an imagefolder dataset."""

    out: str
    """Output folder (written atomically)."""
    overwrite: bool = False
    """Replace an existing non-empty output folder."""
