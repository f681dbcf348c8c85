"""``t2i pipeline CONFIG.yaml --out RUN_DIR``: train -> evaluate -> export -> Bento -> report.

Each stage reads the previous stage's artifact from disk and writes its own under RUN_DIR:

    RUN_DIR/train/    model/ (diffusers), checkpoints/, logs/, train_report.json   (t2i train)
    RUN_DIR/eval/     compare.json + before_after.png (or eval.json)               (t2i eval --compare)
    RUN_DIR/export/   variants, export.json, bench.md, bench.png                    (t2i export)
    RUN_DIR/bento.json  the Bento's tag                                             (t2i bento)
    RUN_DIR/report.html, report.md, report/  (always rewritten)

A stage whose artifact is complete is skipped, so a re-run after a crash or Ctrl-C goes on where it
stopped (training resumes from its last checkpoint); ``--force STAGE`` redoes that stage and the
stages after it, whose inputs it changes.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from core.errors import UserError
from core.io import write_json
from pipeline.config import PipelineConfig
from training.config import TrainConfig

STAGES = ("train", "eval", "export", "bento", "report")


def stage_paths(out: Path) -> dict[str, Path]:
    """The artifact whose presence means the stage is complete."""
    return {"train": out / "train" / "train_report.json", "eval": out / "eval" / "done.json",
            "export": out / "export" / "export.json", "bento": out / "bento.json", "report": out / "report.html"}


def _clear(stage: str, out: Path) -> None:
    """Removes a stage's artifact (for --force); training keeps nothing, not even checkpoints."""
    target = {"train": out / "train", "eval": out / "eval", "export": out / "export", "bento": out / "bento.json",
              "report": out / "report.html"}[stage]
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


class Pipeline:
    def __init__(self, cfg: PipelineConfig, out: str | Path, force: list[str] | None = None):
        self.cfg, self.out = cfg, Path(out)
        for s in force or []:
            if s not in STAGES:
                raise UserError(f"--force {s}: unknown stage; stages are {', '.join(STAGES)}")
        first_forced = min((STAGES.index(s) for s in force or []), default=len(STAGES))
        self.forced = set(STAGES[first_forced:])
        self.paths = stage_paths(self.out)
        self.state_path = self.out / "pipeline.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}
        # the run folder decides where training writes; the eval runs as a stage of its own
        self.train_cfg: TrainConfig = cfg.training.train_config().model_copy(
            update={"output_dir": str(self.out / "train")})

    # -- stages ---------------------------------------------------------------------------------
    def train(self) -> str:
        from training.train import main as train_main

        cfg = self.train_cfg
        if any((self.out / "train" / "checkpoints").glob("checkpoint-*")) and not cfg.checkpoint.resume_from:
            cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume_from": "latest"})})
        report = train_main(cfg)
        return f"{report['steps']} steps, final loss {report['final_loss']:.4f}, {report['images_per_s']} img/s"

    def eval(self) -> str:
        from core.io import atomic_dir

        ecfg = self.cfg.training.eval
        if ecfg is None:
            write_json(self.paths["eval"], {"skipped": "no eval: section in the config"})
            return "skipped (no eval: section in the config)"
        with atomic_dir(self.out / "eval") as tmp:  # a killed eval leaves no half-written folder
            result = evaluate_trained(self.train_cfg, ecfg, tmp)
            write_json(tmp / "done.json", result)
        if "summary" in result:
            s = result["summary"]
            return "; ".join(f"{k}: adherence {v['adherence_before']} -> {v['adherence_after']}%, FID "
                             f"{v['fid_before']} -> {v['fid_after']}" for k, v in s.items())
        return "evaluated"

    def export(self) -> str:
        from export.config import ExportConfig
        from export.export import main as export_main

        e = self.cfg.export
        base = {"model": str(self.out / "train" / "model"), "out": str(self.out / "export"),
                **e.model_dump(exclude_none=True)}
        shutil.rmtree(self.out / "export", ignore_errors=True)  # variants of a killed run are not trusted
        manifest = export_main(ExportConfig.model_validate(base))
        return f"selected {manifest.selected} ({manifest.selection_reason})"

    def bento(self) -> str:
        if not self.cfg.bento:
            write_json(self.paths["bento"], {"skipped": "bento: false in the config"})
            return "skipped (bento: false)"
        from serving.bento import build

        result = build(self.out / "export")
        write_json(self.paths["bento"], result)
        return f"Bento {result['tag']}"

    def report(self) -> str:
        from pipeline.report import write_report

        write_report(self.out, self.cfg, self.state)
        return f"{self.out / 'report.html'}"

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        from core.config import dump_config

        dump_config(self.cfg, self.out / "config.yaml")
        t_start = time.time()
        for i, stage in enumerate(STAGES, 1):
            done = self.paths[stage].exists() and stage not in self.forced and stage != "report"
            header = f"[{i}/{len(STAGES)}] {stage}"
            if done:
                print(f"{header}: already complete ({self.paths[stage]}), skipped", flush=True)
                self.state["stages"].setdefault(stage, {})["skipped_last_run"] = True
                continue
            if stage in self.forced and stage != "report":
                _clear(stage, self.out)
            print(f"\n{'=' * 20} {header} {'=' * 20}  (pipeline elapsed {_hms(time.time() - t_start)})", flush=True)
            t0 = time.time()
            what = getattr(self, stage)()
            self.state["stages"][stage] = {"seconds": round(time.time() - t0, 1), "result": what,
                                           "skipped_last_run": False, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            write_json(self.state_path, self.state)
            print(f"{header}: done in {_hms(time.time() - t0)}: {what}", flush=True)
        self.state["last_run_s"] = round(time.time() - t_start, 1)
        write_json(self.state_path, self.state)
        return self.state


def evaluate_trained(cfg: TrainConfig, ecfg, out: Path) -> dict:
    """Compares a trained model (cfg.output_dir/model) with the one it started from: known vs newly
    taught concepts (the new ones: ecfg.new_concepts, else the focus words). A model trained from a
    random preset is evaluated alone."""
    from evaluation.evaluate import compare, evaluate, format_table
    from training.presets import PRESETS

    if not ecfg.new_concepts and cfg.focus_words_resolved():
        ecfg = ecfg.model_copy(update={"new_concepts": cfg.focus_words_resolved()})
        print(f"eval: new concepts = the focus words ({', '.join(ecfg.new_concepts)}); set eval.new_concepts "
              "to choose others")
    model = str(Path(cfg.output_dir) / "model")
    if cfg.model.pretrained in PRESETS:  # nothing meaningful to compare a random init with
        report = evaluate(model, str(out), ecfg)
        print(format_table(report))
        return {"splits": report["splits"], "features": report["features"]}
    report = compare(model, cfg.model.pretrained, str(out), ecfg)
    print(format_table(report))
    return {"summary": report["summary"], "features": report["features"]}


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


def summary(out: Path) -> str:
    """What a person wants at the end: what was trained, how it scores, the bench table, how to serve."""
    from evaluation.evaluate import format_table
    from export.manifest import read_manifest
    from export.report import bench_table

    out = Path(out)
    lines = []
    tr = json.loads((out / "train" / "train_report.json").read_text())
    lines.append(f"trained: {tr['what']}, {tr['steps']} steps on {tr['num_images']} images in "
                 f"{tr['wall_time_s']:.0f} s -> {out / 'train' / 'model'}")
    cmp_path = out / "eval" / "compare.json"
    if cmp_path.exists():
        lines += ["", "against the starting model:", format_table(json.loads(cmp_path.read_text()))]
    manifest = read_manifest(out / "export")
    lines += ["", bench_table(manifest), f"selected: {manifest.selected} ({manifest.selection_reason})"]
    bento = json.loads((out / "bento.json").read_text()) if (out / "bento.json").exists() else {}
    if bento.get("tag"):
        lines.append(f"Bento: {bento['tag']}")
    state = json.loads((out / "pipeline.json").read_text())
    lines += ["", f"report: {out / 'report.html'}   (stage times: " + ", ".join(
        f"{k} {_hms(v['seconds'])}" for k, v in state["stages"].items() if "seconds" in v) + ")",
        "", "serve it:", f"  .venv/bin/t2i serve {out / 'export'} --port 3000"]
    if bento.get("tag"):
        lines.append(f"  or the Bento: bentoml serve {bento['tag']}   (container: bentoml containerize {bento['tag']})")
    lines.append('  then: curl -X POST localhost:3000/generate -H "Content-Type: application/json" '
                 "-d '{\"prompt\": \"a purple star on the left\"}' -o star.png")
    return "\n".join(lines)
