"""The pipeline config: the stage configs composed, one section each.

    training: configs/finetune-demo.yaml     # a training config (a file, or the mapping inline)
    export: {variants: [eager-fp32, onnx-fp32], num_images: 48}
    bento: true
"""
from __future__ import annotations

from pydantic import Field, create_model

from core.config import Strict
from evaluation.config import EvalConfig
from export.config import ExportConfig
from training.config import TrainConfig


class TrainAndEval(TrainConfig):
    """``t2i train``'s config: a training config plus an optional ``eval:`` section, which compares the
    trained model with the one it started from once training is done."""

    eval: EvalConfig | None = None
    """Evaluate against the starting model after training (as t2i eval --compare); null skips it."""

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(exclude={"eval"}))


def _export_section() -> type[Strict]:
    """``export:`` of a pipeline config: ExportConfig's fields (same names, defaults and docs) but
    the paths, which the pipeline sets (RUN_DIR/train/model -> RUN_DIR/export)."""
    fields = {k: (f.annotation, f) for k, f in ExportConfig.model_fields.items() if k not in ("model", "out")}
    return create_model("PipelineExport", __base__=Strict, **fields)


PipelineExport = _export_section()


class PipelineConfig(Strict):
    """``t2i pipeline CONFIG --out RUN_DIR``: train -> eval -> export -> Bento -> report."""

    training: TrainAndEval = Field(default_factory=TrainAndEval)
    """The training stage (t2i train); its eval: section is the eval stage. A path to a training YAML
    works too."""
    export: PipelineExport = Field(default_factory=PipelineExport)
    """Export and benchmark settings (t2i export)."""
    bento: bool = True
    """Build a Bento of the selected variant (t2i bento)."""
