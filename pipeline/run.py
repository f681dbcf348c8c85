"""``t2i pipeline CONFIG.yaml --out RUN_DIR``: train -> evaluate -> export -> Bento -> report.

Each stage reads the previous stage's artifact from disk and writes its own under RUN_DIR:

    RUN_DIR/train/    model/ (diffusers), checkpoints/, logs/, train_report.json   (t2i train)
    RUN_DIR/eval/     compare.json + before_after.png (or eval.json)               (t2i eval --compare)
    RUN_DIR/export/   variants, export.json, bench.md, bench.png                    (t2i export)
    RUN_DIR/bento.json  the Bento's tag                                             (t2i bento)
    RUN_DIR/report.html, report.md, report/  (always rewritten)

A stage whose artifact is complete and was made by the same config is skipped, so a re-run after a
crash or Ctrl-C goes on where it stopped (training resumes from its last checkpoint). Each stage
records in pipeline.json the hash of its own config section and of the outputs it read; a re-run
whose config differs for that stage, or for a stage it reads from, redoes it and says why.
``--force STAGE`` redoes that stage and the stages after it, whose inputs it changes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from core.errors import UserError
from core.io import read_json_file, write_json
from pipeline.config import PipelineConfig
from training.config import TrainConfig

STAGES = ("train", "eval", "export", "bento", "report")
READS = {"train": (), "eval": ("train",), "export": ("train",), "bento": ("export",), "report": ()}  # inputs
STATE_REMEDY = "delete it to redo every stage"


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
        self.state = read_state(self.state_path)
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
            from pipeline.report import or_dash as d

            return "; ".join(f"{k}: adherence {d(v['adherence_before'])} -> {d(v['adherence_after'], '%')}, FID "
                             f"{d(v['fid_before'])} -> {d(v['fid_after'])}" for k, v in s.items())
        return "evaluated"

    def export_config(self):
        """The export stage's ExportConfig: RUN_DIR/train/model -> RUN_DIR/export, and, when the training
        data is the user's own, that data as the quality gate's prompts and references."""
        from export.config import ExportConfig

        e = self.cfg.export
        base = {"model": str(self.out / "train" / "model"), "out": str(self.out / "export"),
                **e.model_dump(exclude_none=True)}
        if e.references is None:
            base["references"] = users_data(self.train_cfg)
        return ExportConfig.model_validate(base)

    def export(self) -> str:
        from export.export import main as export_main

        cfg = self.export_config()
        # a variant folder of an earlier or killed run is kept only if its build.json says it was made from
        # the same model and settings, complete and unchanged since (export.reuse)
        manifest = export_main(cfg)
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

    # -- config keys ----------------------------------------------------------------------------
    def stage_config(self, stage: str) -> dict:
        """The part of the pipeline config that decides what ``stage`` makes."""
        if stage == "train":  # where it writes and whether it resumes do not change the model
            return {"training": self.train_cfg.model_dump(mode="json", exclude={"output_dir": True,
                                                                                 "checkpoint": {"resume_from"}})}
        if stage == "eval":
            ecfg = self.cfg.training.eval
            return {"eval": ecfg.model_dump(mode="json") if ecfg is not None else None}
        if stage == "export":
            return {"export": self.cfg.export.model_dump(mode="json")}
        if stage == "bento":
            return {"bento": self.cfg.bento}
        return {}

    def config_hash(self, stage: str) -> str:
        """Hash of the stage's config section and of the outputs it reads (each stage output's id)."""
        inputs = {s: self.state["stages"].get(s, {}).get("output_id") for s in READS[stage]}
        blob = json.dumps({"config": self.stage_config(stage), "inputs": inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def why_redo(self, stage: str) -> str | None:
        """None when the stage's recorded config hash matches; else why it must be made again."""
        rec = self.state["stages"].get(stage, {})
        if rec.get("config_hash") == self.config_hash(stage):
            return None
        if "config_hash" not in rec:
            return "pipeline.json holds no record of the config that made it"
        changed = _changed_keys(rec.get("config", {}), self.stage_config(stage))
        if changed:
            more = f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
            return "its config changed: " + "; ".join(changed[:5]) + more
        made = {s: self.state["stages"].get(s, {}).get("output_id") for s in READS[stage]}
        redone = [s for s in READS[stage] if rec.get("inputs", {}).get(s) != made[s]]
        return f"{' and '.join(redone) or 'an earlier stage'}, which it reads, was made again"

    def _record(self, stage: str, **fields) -> None:
        self.state["stages"][stage] = {"config_hash": self.config_hash(stage), "config": self.stage_config(stage),
                                       "inputs": {s: self.state["stages"].get(s, {}).get("output_id")
                                                  for s in READS[stage]}, **fields}
        write_json(self.state_path, self.state)

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        from core.config import dump_config

        dump_config(self.cfg, self.out / "config.yaml")
        t_start = time.time()
        for i, stage in enumerate(STAGES, 1):
            header = f"[{i}/{len(STAGES)}] {stage}"
            if stage != "report":  # the report is always rewritten
                rec = self.state["stages"].get(stage, {})
                why = self.why_redo(stage)
                complete = self.paths[stage].exists() and rec.get("status") == "done"
                if stage in self.forced:
                    _clear(stage, self.out)
                elif complete and why is None:
                    print(f"{header}: already complete ({self.paths[stage]}), skipped", flush=True)
                    rec["skipped_last_run"] = True
                    continue
                elif why is not None and (self.paths[stage].exists() or _begun(stage, self.out)):
                    print(f"{header}: making it again: {why}", flush=True)
                    if stage != "export":  # export keeps the variant folders its inputs still make (export.reuse)
                        _clear(stage, self.out)
                # else: begun with this config and interrupted: go on (training resumes from its checkpoint)
            print(f"\n{'=' * 20} {header} {'=' * 20}  (pipeline elapsed {_hms(time.time() - t_start)})", flush=True)
            self._record(stage, status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"))
            t0 = time.time()
            what = getattr(self, stage)()
            self._record(stage, status="done", output_id=uuid.uuid4().hex[:12], seconds=round(time.time() - t0, 1),
                         result=what, skipped_last_run=False, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            print(f"{header}: done in {_hms(time.time() - t0)}: {what}", flush=True)
        self.state["last_run_s"] = round(time.time() - t_start, 1)
        write_json(self.state_path, self.state)
        return self.state


def read_state(path: Path) -> dict:
    """pipeline.json, or a fresh state when there is none; a corrupt one is one UserError line."""
    if not Path(path).exists():
        return {"stages": {}}
    state = read_json_file(path, "pipeline state", STATE_REMEDY)
    stages = state.get("stages", {})
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise UserError(f"pipeline state {path} is corrupt ('stages' is not a mapping of stages); {STATE_REMEDY}")
    return {**state, "stages": stages}


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _changed_keys(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs, or that only one side has (a setting
    added to the code since the stage was made: its default may not be what the stage did)."""
    a, b = _flatten(old), _flatten(new)

    def show(d, k):
        return json.dumps(d[k]) if k in d else "(absent)"
    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
            if k not in a or k not in b or a[k] != b[k]]


def _begun(stage: str, out: Path) -> bool:
    """Whether an unfinished stage left work that a changed config must not resume (training's checkpoints)."""
    return stage == "train" and (out / "train").exists()


def users_data(cfg: TrainConfig) -> dict | None:
    """The training data as the references of eval and the export gate ({path, columns}) when it is the
    user's own; None for the synthetic world (set to render, or a folder t2i rendered), whose prompts
    have renders of their own scenes to be measured against."""
    from synthetic.dataset import SPEC_FILE

    data = cfg.data
    if data.synthetic is not None or (Path(data.path) / SPEC_FILE).is_file():
        return None
    return {"path": data.path, "image_column": data.image_column, "caption_column": data.caption_column}


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
    if ecfg.references is None and users_data(cfg):
        from core.config import ReferenceData

        ecfg = ecfg.model_copy(update={"references": ReferenceData.model_validate(users_data(cfg))})
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
    tr = read_json_file(out / "train" / "train_report.json", "train report", "re-run with --force train")
    lines.append(f"trained: {tr['what']}, {tr['steps']} steps on {tr['num_images']} images in "
                 f"{tr['wall_time_s']:.0f} s -> {out / 'train' / 'model'}")
    cmp_path = out / "eval" / "compare.json"
    if cmp_path.exists():
        lines += ["", "against the starting model:",
                  format_table(read_json_file(cmp_path, "eval result", "re-run with --force eval"))]
    manifest = read_manifest(out / "export")
    lines += ["", bench_table(manifest), f"selected: {manifest.selected} ({manifest.selection_reason})"]
    bento = read_json_file(out / "bento.json", "bento record", "re-run with --force bento") \
        if (out / "bento.json").exists() else {}
    if bento.get("tag"):
        lines.append(f"Bento: {bento['tag']}")
    state = read_state(out / "pipeline.json")
    lines += ["", f"report: {out / 'report.html'}   (stage times: " + ", ".join(
        f"{k} {_hms(v['seconds'])}" for k, v in state["stages"].items() if "seconds" in v) + ")",
        "", "serve it:", f"  .venv/bin/t2i serve {out / 'export'} --port 3000"]
    if bento.get("tag"):
        lines.append(f"  or the Bento: bentoml serve {bento['tag']}   (container: bentoml containerize {bento['tag']})")
    lines.append('  then: curl -X POST localhost:3000/generate -H "Content-Type: application/json" '
                 "-d '{\"prompt\": \"a purple star on the left\"}' -o star.png")
    return "\n".join(lines)
