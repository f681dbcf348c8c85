"""``t2i``: the one entry point. Every command is ``t2i COMMAND [POSITIONAL] [CONFIG.yaml] [key=value ...]``
with ``--flags`` generated from the command's config model (``core.cli``).

Bad input raises ``UserError`` anywhere below; it is printed as one line and the exit code is 2.
Building the parser imports only the config models, never torch, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys

from core.errors import UserError

DESCRIPTIONS = {
    "data check": "Check a dataset before training on it: how many images, their sizes, caption lengths, the "
                  "words the model's tokenizer splits into many pieces, and how well the model's VAE represents the "
                  "images (round-trip PSNR); warns with the remedy when it cannot.",
    "data shapes": "Render the synthetic captioned shapes world as an imagefolder dataset (PNGs + metadata.jsonl "
                   "with file_name, text and the ground-truth attributes), deterministically from the seed.",
    "train": "Train or fine-tune (full UNet, LoRA, or the VAE) from a YAML recipe, e.g.\n"
             "  t2i train configs/finetune-demo.yaml train.max_steps=200 output_dir=runs/x\n"
             "Multi-process: accelerate launch --multi_gpu --num_processes 2 -m pipeline.cli train CONFIG",
    "generate": "Generate images for one prompt from a diffusers model dir.",
    "eval": "Evaluate a model dir on a fixed prompt set and seeds: FID against real images of the same scenes, "
            "prompt adherence (domain classifier), Inception Score, CLIP score (optional). With --compare BASE: "
            "the same prompts and seeds on both models, split into known and newly taught concepts.",
    "export": "Build optimized variants of a model dir (8-bit torchao / bitsandbytes, torch.compile, ONNX Runtime "
              "fp32/fp16/int8, bf16/fp16), benchmark each one's latency and its FID / adherence drift from "
              "eager-fp32 on the same prompts and seeds, and select the fastest variant inside the quality budget.",
    "pipeline": "Train, evaluate against the starting model, export and benchmark the variants, select the fastest "
                "inside the quality budget and build a Bento, each stage writing under --out. Completed stages are "
                "skipped on a re-run (training resumes from its last checkpoint); --force STAGE redoes a stage and "
                "the ones after it. Ends with a summary and RUN_DIR/report.html.",
    "serve": "Start `bentoml serve` on an export dir's variant: POST /generate (PNG), POST /v1/images/generations "
             "(OpenAI Images API), GET /info; /healthz, /readyz, /livez and /metrics. Ctrl-C or SIGTERM stops it.",
    "bento": "Build a Bento (bentofile.yaml) carrying the service code and one variant of an export dir into the "
             "local Bento store ($BENTOML_HOME); `bentoml containerize TAG` then builds the OCI image (needs Docker).",
    "train-autoencoder": "Fine-tune a model's VAE on a broad image mix (packaged photos, procedural textures, the "
                         "synthetic world) while keeping its latents of the synthetic world, so the base UNet stays "
                         "valid; writes OUT/vae (the best held-out checkpoint) and OUT/metrics.jsonl.",
    "train-classifier": "Train the domain classifier (adherence heads + domain-FID features) on generator images.",
}


def _commands() -> dict[str, tuple]:
    """name -> (config class, positional fields, takes a YAML file, help line). Config modules only."""
    from evaluation.config import ClassifierConfig, EvalJob
    from export.config import ExportConfig
    from pipeline.config import PipelineConfig
    from pipeline.generate import GenerateConfig
    from serving.config import BentoConfig, ServeConfig
    from synthetic.config import ShapesConfig
    from training.config import AutoencoderConfig, DataCheckConfig
    from pipeline.config import TrainAndEval

    return {
        "data shapes": (ShapesConfig, (), True, "the synthetic captioned shapes world"),
        "data check": (DataCheckConfig, ("path",), True, "check a dataset against a model (VAE fit, captions)"),
        "train": (TrainAndEval, (), True, "train or fine-tune (full, LoRA, VAE)"),
        "generate": (GenerateConfig, ("model", "prompt"), True, "generate images from a model dir"),
        "eval": (EvalJob, ("model",), True, "FID, prompt adherence, forgetting"),
        "export": (ExportConfig, ("model",), True, "optimized variants + benchmark + selection"),
        "pipeline": (PipelineConfig, (), True, "train -> eval -> export -> Bento, one command"),
        "serve": (ServeConfig, ("export_dir",), True, "serve an export dir over HTTP (BentoML)"),
        "bento": (BentoConfig, ("export_dir",), True, "build a Bento of an export dir"),
        "train-autoencoder": (AutoencoderConfig, (), True, "make a VAE that represents real images"),
        "train-classifier": (ClassifierConfig, (), True, "train the domain classifier"),
    }


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=110)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("t2i-sprint")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from core.cli import add_config_arguments

    p = argparse.ArgumentParser(prog="t2i", formatter_class=_Formatter,
                                description="Fine-tune, export and serve text-to-image diffusion models "
                                "(train -> export -> serve). `t2i COMMAND --help` lists every config key.")
    p.add_argument("--version", action="version", version=f"t2i-sprint {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (cls, positional, takes_file, help_line) in _commands().items():
        parent = sub
        if " " in name:  # `data shapes`: a family of commands
            family, leaf = name.split(" ", 1)
            if family not in groups:
                fp = sub.add_parser(family, help="make datasets", description="Make datasets.")
                groups[family] = fp.add_subparsers(dest="kind", required=True, metavar="KIND")
            parent, sub_name = groups[family], leaf
        else:
            sub_name = name
        c = parent.add_parser(sub_name, help=help_line, description=DESCRIPTIONS[name], formatter_class=_Formatter)
        if name == "pipeline":
            c.add_argument("--out", required=True, help="run folder for every stage's artifacts")
            c.add_argument("--force", action="append", default=[], metavar="STAGE",
                           help="redo STAGE (train, eval, export, bento, report) and the stages after it")
        add_config_arguments(c, cls, positional, takes_file)
        c.set_defaults(_command=name)
    return p


# ---------------------------------------------------------------------------------------- commands

def run_command(name: str, cfg, ns: argparse.Namespace) -> None:
    if name == "data shapes":
        from synthetic.dataset import generate_dataset

        out = generate_dataset(cfg.out, cfg.n, cfg.seed, cfg.size, cfg.spec(), overwrite=cfg.overwrite)
        print(f"wrote {cfg.n} images + metadata.jsonl to {out}")
    elif name == "data check":
        from core.datasets import format_summary
        from training.fit import check

        res = check(cfg)
        print(format_summary(res["summary"]))
        fit = res["vae_fit"]
        print(f"VAE round trip of {cfg.model} at {res['resolution']} px on {fit['images']} images: "
              f"{fit['psnr_db']} dB PSNR (worst {fit['psnr_db_min']})"
              + (f", grayscale chroma error {fit['gray_chroma_error']}/255" if fit["gray_chroma_error"] is not None else ""))
        print(f"warning: {res['poor_fit']}" if res["poor_fit"] else f"fits: above {cfg.min_vae_psnr:g} dB")
    elif name == "train":
        from pathlib import Path

        from core.io import read_json_file, write_json

        tcfg = cfg.train_config()
        tcfg.check_paths()  # before the training stack imports
        from pipeline.run import evaluate_trained
        from training.train import main

        report = main(tcfg)
        if report and int(os.environ.get("RANK", "0")) == 0:
            print(f"trained {report['steps']} steps in {report['wall_time_s']} s "
                  f"({report['images_per_s']} img/s); final loss {report['final_loss']:.4f}")
            print(f"model dir: {cfg.output_dir}/model")
            if cfg.eval is not None:
                out = Path(cfg.output_dir)
                saved = read_json_file(out / "train_report.json", "train report")
                write_json(out / "train_report.json", saved | {"eval": evaluate_trained(tcfg, cfg.eval, out / "eval")})
    elif name == "generate":
        from pipeline.generate import generate

        for path in generate(cfg):
            print(f"wrote {path}")
    elif name == "eval":
        from evaluation.config import EvalConfig
        from evaluation.evaluate import compare, evaluate, format_table

        ecfg = EvalConfig.model_validate(cfg.model_dump(exclude={"model", "out", "compare"}))
        if cfg.compare:
            report = compare(cfg.model, cfg.compare, cfg.out, ecfg)
            print(format_table(report))
            print(f"wrote {cfg.out}/compare.json and {cfg.out}/before_after.png")
        else:
            report = evaluate(cfg.model, cfg.out, ecfg)
            print(format_table(report))
            print(f"wrote {cfg.out}/eval.json and {cfg.out}/samples.png")
    elif name == "export":
        from export.export import main as export_main
        from export.report import bench_table

        manifest = export_main(cfg)
        print(bench_table(manifest))
        print(f"selected: {manifest.selected} ({manifest.selection_reason})")
        print(f"wrote {cfg.out}/export.json, bench.md, bench.png")
    elif name == "pipeline":
        from pipeline.run import Pipeline, summary

        Pipeline(cfg, ns.out, ns.force).run()
        print("\n" + summary(ns.out))
    elif name == "serve":
        from serving.run import serve

        raise SystemExit(serve(cfg))
    elif name == "bento":
        from serving.bento import build

        out = build(cfg.export_dir, cfg.variant, cfg.version)
        print(f"built Bento {out['tag']} (variant {out['variant']}) at {out['path']}")
        print(f"serve it:        bentoml serve {out['tag']}")
        print(f"containerize it: bentoml containerize {out['tag']}   (needs Docker)")
    elif name == "train-autoencoder":
        from training.autoencoder import main as train_autoencoder

        best = train_autoencoder(cfg)
        if best["step"] == 0:
            raise UserError(f"no evaluation reached min_psnr_photos={cfg.min_psnr_photos} dB, so nothing was "
                            f"written to {cfg.output_dir}/vae (every evaluation: {cfg.output_dir}/metrics.jsonl)")
        print(f"kept step {best['step']} (select_by: {cfg.select_by}): held-out photos {best['psnr_photos']} dB, "
              f"grayscale {best['psnr_gray']} dB (chroma error {best['gray_chroma_err']}/255), synthetic world "
              f"{best['psnr_synthetic']} dB; wrote {cfg.output_dir}/vae")
    elif name == "train-classifier":
        from evaluation.classifier import train_classifier

        metrics = train_classifier(cfg)
        print("held-out accuracy per head: "
              + ", ".join(f"{k} {v:.2%}" for k, v in metrics["held_out_accuracy"].items()))
        print(f"wrote {cfg.output_dir}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; positionals and key=value may come before, between or after the flags."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    ns.args = [*getattr(ns, "args", []), *extra]
    return ns


def main(argv: list[str] | None = None) -> int:
    from core.cli import config_from_args

    ns = parse_args(argv)
    name = ns._command
    try:
        cfg = config_from_args(ns)
        from core.quiet import quiet_libraries

        quiet_libraries()
        run_command(name, cfg, ns)
    except UserError as e:
        print(f"t2i {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2i {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
