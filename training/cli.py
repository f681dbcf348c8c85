"""``t2i``: the one entry point (data, train, generate; later eval, export, pipeline, serve).

Bad input raises ``UserError`` anywhere below; it is printed as one line and the exit code is 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
import warnings

# Library chatter (optional-kernel probes, deprecations) hides the lines a user needs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
for _name in ("torch.utils._pytree", "torchao", "bitsandbytes", "accelerate", "datasets"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from training.errors import UserError  # noqa: E402


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _config_help(cls) -> str:
    from training.config import describe

    return "config keys (YAML or key=value overrides):\n" + "\n".join(describe(cls))


def cmd_data(args) -> None:
    from training.data import WorldSpec, generate_dataset

    spec = WorldSpec(tuple(_csv(args.exclude)), tuple(_csv(args.focus)), args.focus_fraction, args.max_shapes,
                     tuple(_csv(args.contrast)), args.contrast_fraction)
    out = generate_dataset(args.out, args.n, args.seed, args.size, spec, overwrite=args.overwrite)
    print(f"wrote {args.n} images + metadata.jsonl to {out}")


def cmd_train(args) -> None:
    from training.config import load_config
    from training.train import TrainConfig, main

    from pipeline.run import PipelineConfig

    # a pipeline config (with export: / bento:) trains too: those sections belong to later stages
    full = load_config(PipelineConfig, args.config, args.overrides)
    cfg = TrainConfig.model_validate(full.model_dump(exclude={"export", "bento"}))
    report = main(cfg)
    if report and int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {report['steps']} steps in {report['wall_time_s']} s "
              f"({report['images_per_s']} img/s); final loss {report['final_loss']:.4f}")
        print(f"model dir: {cfg.output_dir}/model")


def cmd_generate(args) -> None:
    from training.generate import generate

    paths = generate(args.model, args.prompt, args.out, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, scheduler=args.scheduler, num_images=args.num_images,
                     negative_prompt=args.negative_prompt, size=args.size)
    for p in paths:
        print(f"wrote {p}")


def cmd_eval(args) -> None:
    from evaluation.evaluate import EvalConfig, compare, evaluate, format_table
    from training.config import load_config

    cfg = load_config(EvalConfig, None, [], base={
        "num_images": args.num_images, "prompts": args.prompts, "new_concepts": _csv(args.new_concepts),
        "features": args.features, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "clip_model": args.clip_model, "reference_per_prompt": args.reference_per_prompt})
    if args.compare:
        report = compare(args.model, args.compare, args.out, cfg)
        print(format_table(report))
        print(f"wrote {args.out}/compare.json and {args.out}/before_after.png")
    else:
        report = evaluate(args.model, args.out, cfg)
        print(format_table(report))
        print(f"wrote {args.out}/eval.json and {args.out}/samples.png")


def cmd_train_classifier(args) -> None:
    from evaluation.classifier import ClassifierConfig, train_classifier
    from training.config import load_config

    cfg = load_config(ClassifierConfig, args.config, args.overrides)
    metrics = train_classifier(cfg)
    print("held-out accuracy per head: " + ", ".join(f"{k} {v:.2%}" for k, v in metrics["held_out_accuracy"].items()))
    print(f"wrote {cfg.output_dir}")


def cmd_export(args) -> None:
    from export.export import ExportConfig, main as export_main
    from export.report import bench_table
    from training.config import load_config

    base = {"model": args.model, "out": args.out, "max_fid_drift": args.max_fid_drift,
            "max_adherence_drop": args.max_adherence_drop, "num_images": args.num_images,
            "batch_sizes": [int(b) for b in _csv(args.batch_sizes)], "steps": args.steps,
            "features": args.features, "select": args.select, "device": args.device, "repeats": args.repeats}
    if args.variants:
        base["variants"] = _csv(args.variants)
    cfg = load_config(ExportConfig, None, [], base=base)
    manifest = export_main(cfg)
    print(bench_table(manifest))
    print(f"selected: {manifest['selected']} ({manifest['selection_reason']})")
    print(f"wrote {args.out}/export.json, bench.md, bench.png")


def cmd_pipeline(args) -> None:
    from pipeline.run import Pipeline, PipelineConfig, summary
    from training.config import load_config

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    Pipeline(cfg, args.out, args.force).run()
    print("\n" + summary(args.out))


def cmd_serve(args) -> None:
    import subprocess

    from export.loader import read_manifest
    from serving.config import ServingConfig, to_env

    read_manifest(args.export_dir)  # a wrong path is a clear error here, not a crash in a worker
    cfg = ServingConfig(export_dir=args.export_dir, variant=args.variant, device=args.device,
                        max_batch_size=args.max_batch_size, max_latency_ms=args.max_latency_ms,
                        max_concurrency=args.max_concurrency, timeout_s=args.timeout)
    env = {**os.environ, **to_env(cfg)}
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:ImageAPI", "--host", args.host,
           "--port", str(args.port), "--working-dir", str(Path(__file__).resolve().parents[1])]
    print(f"serving {args.export_dir} on http://{args.host}:{args.port} (POST /generate, "
          f"POST /v1/images/generations, GET /info); Ctrl-C stops", flush=True)
    raise SystemExit(subprocess.call(cmd, env=env))


def cmd_bento(args) -> None:
    from serving.bento import build

    out = build(args.export_dir, args.variant, args.version)
    print(f"built Bento {out['tag']} (variant {out['variant']}) at {out['path']}")
    print(f"serve it:        bentoml serve {out['tag']}")
    print(f"containerize it: bentoml containerize {out['tag']}   (needs Docker)")


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from evaluation.classifier import ClassifierConfig
    from training.train import TrainConfig

    p = argparse.ArgumentParser(prog="t2i", description="Fine-tune, export and serve text-to-image "
                                "diffusion models (train -> export -> serve).", formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="generate a dataset", description="Generate datasets.")
    dsub = d.add_subparsers(dest="kind", required=True, metavar="KIND")
    s = dsub.add_parser("shapes", formatter_class=_Formatter, help="the synthetic captioned shapes world",
                        description="Render captioned shapes (imagefolder layout: PNGs + metadata.jsonl with "
                        "file_name, text and the ground-truth attributes). Deterministic from --seed.")
    s.add_argument("--out", required=True, help="output folder (written atomically)")
    s.add_argument("--n", type=int, default=2000, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    s.add_argument("--exclude", help="comma-separated concepts never drawn, e.g. star,heart,purple")
    s.add_argument("--focus", help="comma-separated concepts to steer images towards (fine-tune data)")
    s.add_argument("--focus-fraction", type=float, default=1.0,
                   help="share of images with a focus concept (the rest replay the whole world)")
    s.add_argument("--contrast", help="comma-separated known concepts to replay more often: those nearest to the "
                   "focus ones, e.g. pink,cross next to purple,star")
    s.add_argument("--contrast-fraction", type=float, default=0.0,
                   help="share of images with a contrast concept (at most 1 - focus fraction)")
    s.add_argument("--max-shapes", type=int, default=1, help="up to this many shapes per image (1-3)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    s.set_defaults(func=cmd_data)

    t = sub.add_parser("train", formatter_class=_Formatter, help="train or fine-tune (full, LoRA, VAE)",
                       description="Train from a YAML recipe with dotted key=value overrides, e.g.\n"
                       "  t2i train configs/finetune-demo.yaml train.max_steps=200 output_dir=runs/x\n"
                       "Multi-process: accelerate launch --multi_gpu --num_processes 2 -m training.cli train ...",
                       epilog=_config_help(TrainConfig))
    t.add_argument("config", help="YAML recipe (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", formatter_class=_Formatter, help="generate images from a model dir",
                       description="Generate images with diffusers' StableDiffusionPipeline from a model dir.")
    g.add_argument("model", help="diffusers model dir (or hub id, online)")
    g.add_argument("prompt", help="text prompt")
    g.add_argument("--out", default="out.png", help="output PNG; with --num-images > 1 a grid, plus one file each")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from")
    g.add_argument("--steps", type=int, default=20, help="sampling steps (1-200)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (0-30)")
    g.add_argument("--seed", type=int, default=0, help="seed (image i uses seed + i)")
    g.add_argument("--scheduler", default="dpm", choices=["dpm", "ddim", "ddpm", "euler"], help="sampler")
    g.add_argument("--num-images", type=int, default=1, help="images to generate (1-16)")
    g.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", formatter_class=_Formatter, help="FID, prompt adherence, forgetting",
                       description="Evaluate a model dir on a fixed prompt set and seeds: FID against real images "
                       "of the same scenes, prompt adherence (domain classifier), Inception Score, CLIP score "
                       "(optional). With --compare BASE: the same prompts and seeds on both models, split into "
                       "known and newly taught concepts (learning vs forgetting).")
    e.add_argument("model", help="diffusers model dir")
    e.add_argument("--out", required=True, help="folder for eval.json / compare.json and image grids")
    e.add_argument("--compare", metavar="BASE_DIR", help="also evaluate this base model and compare")
    e.add_argument("--new-concepts", help="comma-separated concepts the fine-tune teaches, e.g. star,heart,purple")
    e.add_argument("--prompts", help="text file, one prompt per line (default: fixed set from the caption grammar)")
    e.add_argument("--num-images", type=int, default=800,
                   help="images per model (with --new-concepts half known, half new); FID needs many: one model's "
                        "known-concept FID change moved from +17%% to +10%% between 200 and 800 images")
    e.add_argument("--reference-per-prompt", type=int, default=10,
                   help="real images rendered per prompt (fresh jitter each) for the FID reference statistics")
    e.add_argument("--features", default="auto", choices=["auto", "inception", "domain"],
                   help="FID feature extractor (auto: inception if its weights are on disk, else domain)")
    e.add_argument("--steps", type=int, default=20, help="sampling steps")
    e.add_argument("--guidance", type=float, default=5.0, help="guidance scale")
    e.add_argument("--seed", type=int, default=0, help="prompt-set seed; image i uses seed + i")
    e.add_argument("--clip-model", help="local CLIP model dir for CLIP score (skipped when absent)")
    e.set_defaults(func=cmd_eval)

    from export.variants import DEFAULT_VARIANTS, REGISTRY

    x = sub.add_parser("export", formatter_class=_Formatter, help="optimized variants + benchmark + selection",
                       description="Build optimized variants of a model dir (8-bit torchao / bitsandbytes, "
                       "torch.compile, ONNX Runtime fp32/fp16/int8, bf16/fp16), benchmark each one's latency and its "
                       "FID / adherence drift from eager-fp32 on the same prompts and seeds, and select the fastest "
                       "variant inside the quality budget. Variants: " + ", ".join(REGISTRY))
    x.add_argument("model", help="diffusers model dir")
    x.add_argument("--out", required=True, help="export dir (variants, export.json, bench.md, bench.png)")
    x.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated variant names")
    x.add_argument("--max-fid-drift", type=float, default=5.0, help="budget: FID drift in %% of the baseline")
    x.add_argument("--max-adherence-drop", type=float, default=2.0, help="budget: adherence drop in points")
    x.add_argument("--num-images", type=int, default=100, help="quality images per variant")
    x.add_argument("--batch-sizes", default="1,4", help="batch sizes to time (and warm up)")
    x.add_argument("--repeats", type=int, default=5, help="timed runs per batch size")
    x.add_argument("--steps", type=int, default=20, help="sampling steps (same for all variants)")
    x.add_argument("--features", default="auto", choices=["auto", "inception", "domain"], help="FID features")
    x.add_argument("--select", help="override the selection with this variant")
    x.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where available")
    x.set_defaults(func=cmd_export)

    from pipeline.run import STAGES, PipelineConfig

    pl = sub.add_parser("pipeline", formatter_class=_Formatter, help="train -> eval -> export -> Bento, one command",
                        description="Fine-tune (or train), evaluate against the starting model, export and benchmark "
                        "the variants, select the fastest inside the quality budget and build a Bento, each stage "
                        "writing under RUN_DIR. Completed stages are skipped on a re-run (training resumes from its "
                        "last checkpoint); --force STAGE redoes a stage and the ones after it. Ends with a summary "
                        "and RUN_DIR/report.html. Stages: " + ", ".join(STAGES) + ".",
                        epilog=_config_help(PipelineConfig))
    pl.add_argument("config", help="YAML: a training config, plus optional export: and bento: sections")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    pl.add_argument("--out", required=True, help="run folder for every stage's artifacts")
    pl.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo STAGE (and later stages)")
    pl.set_defaults(func=cmd_pipeline)

    v = sub.add_parser("serve", formatter_class=_Formatter, help="serve an export dir over HTTP (BentoML)",
                       description="Start `bentoml serve` on an export dir's selected variant: POST /generate "
                       "(PNG), POST /v1/images/generations (OpenAI Images API), GET /info; BentoML's /healthz, "
                       "/readyz (ready once the model is loaded and warmed up), /livez and /metrics. Requests are "
                       "batched adaptively; each batch is split into groups of equal steps and size.")
    v.add_argument("export_dir", help="export dir written by `t2i export`")
    v.add_argument("--port", type=int, default=3000, help="HTTP port")
    v.add_argument("--host", default="0.0.0.0", help="address to bind")
    v.add_argument("--variant", help="serve this variant instead of the selected one")
    v.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where available")
    v.add_argument("--max-batch-size", type=int, default=8, help="adaptive batching: most requests per batch "
                   "(1 = batching off)")
    v.add_argument("--max-latency-ms", type=int, default=60000, help="adaptive batching: latency budget; a request "
                   "that cannot meet it gets 503 at once")
    v.add_argument("--max-concurrency", type=int, default=64, help="requests held at once; more get 429")
    v.add_argument("--timeout", type=int, default=300, help="request timeout in seconds")
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("bento", formatter_class=_Formatter, help="build a Bento of an export dir",
                       description="Build a Bento (bentofile.yaml) carrying the service code and the export dir's "
                       "selected variant, into the local Bento store ($BENTOML_HOME, default ~/bentoml). "
                       "`bentoml containerize TAG` then builds the OCI image (needs Docker).")
    b.add_argument("export_dir", help="export dir written by `t2i export`")
    b.add_argument("--variant", help="bundle this variant instead of the selected one")
    b.add_argument("--version", help="Bento version (default: generated)")
    b.set_defaults(func=cmd_bento)

    c = sub.add_parser("train-classifier", formatter_class=_Formatter, help="train the domain classifier",
                       description="Train the domain classifier (adherence heads + domain-FID features) on "
                       "generator images.", epilog=_config_help(ClassifierConfig))
    c.add_argument("config", help="YAML (configs/domain-classifier.yaml)")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    c.set_defaults(func=cmd_train_classifier)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `t2i pipeline CONFIG --out DIR key=value ...`: overrides may also follow the options
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except UserError as e:
        print(f"t2i {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
