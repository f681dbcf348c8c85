r"""Training throughput of the `tiny` preset at batch 16 on this machine, written as JSON.

Compares, in one run (ratios are what to read on a shared, noisy machine):
  cache on  (latents + text embeddings computed once; VAE and text encoder frozen)
  cache off (VAE encode + text encode every step)
  fp32 vs bf16 autocast (cache on)
and, each in a fresh process clocked by benchmarks/step_clock.py on 2,000 images with flips,
start-up (process start to the first step's backward) and steady state (median step over steps
40-80) of `t2i train` (caches filled lazily, and up front) against diffusers'
examples/text_to_image/train_text_to_image.py, and of `t2i train` with LoRA against
train_text_to_image_lora.py (the same adapters: rank 4, alpha 4, attention projections), when a
diffusers checkout is given (--example; the scripts are run from there, pinned by its commit, never
copied here); runs alternate, 2 rounds.
The example needs torchvision, whose PyPI wheels load only next to a CUDA build of torch:
benchmarks/peer_env.sh makes an environment with one (it runs on a CPU too) and the product's
other packages at .venv's versions; run this script with that environment's Python so both
trainers use the same torch.

    .venv/bin/python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json \
        [--example /path/to/diffusers-checkout]
    bash benchmarks/peer_env.sh .peer-venv && .peer-venv/bin/python benchmarks/train_throughput.py \
        --startup-only --example /path/to/diffusers-checkout --out benchmarks/results/train_startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from core.config import load_config  # noqa: E402
from core.io import write_json  # noqa: E402
from synthetic.dataset import generate_dataset  # noqa: E402
from training.presets import build_preset  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import setup, train_step  # noqa: E402


def measure(model: Path, data: Path, work: Path, name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each setting gets its own mixed-precision state
    cfg = load_config(TrainConfig, None, [
        f"model.pretrained={model}", f"data.path={data}", f"output_dir={work / name}", "train.batch_size=16",
        f"train.max_steps={steps + warmup}", "train.warmup_steps=0", *overrides])
    run = setup(cfg)
    for m in run.trainable:
        m.train()
    times = []
    for micro in range(steps + warmup):
        t0 = time.perf_counter()
        train_step(run, micro)
        if micro >= warmup:
            times.append(time.perf_counter() - t0)
    run.acc.end_training()
    med = statistics.median(times)
    return {"name": name, "overrides": overrides, "steps_timed": steps, "median_step_s": round(med, 4),
            "images_per_s": round(16 / med, 2)}


ROOT = Path(__file__).resolve().parents[1]
CLOCK_STEPS = 80
PAIRS = {"ours_lazy_cache": "diffusers_example", "ours_upfront_cache": "diffusers_example",  # ours: its peer
         "ours_lora_lazy_cache": "diffusers_example_lora", "ours_lora_upfront_cache": "diffusers_example_lora"}


def clocked(name: str, cmd: list[str], work: Path) -> dict:
    """One trainer in a fresh process: seconds to its first backward, and its median step after caching."""
    out = work / f"{name}.clock.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_clock.py"), str(out), str(CLOCK_STEPS), *cmd],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if not out.is_file():
        raise SystemExit(f"{name} did not reach {CLOCK_STEPS} steps:\n{res.stderr[-3000:]}")
    stamps = json.loads(out.read_text())["backward_done_s"]
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    med = statistics.median(steps[CLOCK_STEPS // 2:])
    return {"first_step_s": round(stamps[0], 2), "median_step_s": round(med, 4), "images_per_s": round(16 / med, 2)}


def example_imports(script: Path, without_torchvision: bool) -> str:
    """The example script's top-level imports as code (torchvision's left out when it cannot load here)."""
    import ast

    keep = [n for n in ast.parse(script.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "\n".join(ast.unparse(n) for n in keep if not (without_torchvision and "torchvision" in ast.unparse(n)))


def time_imports(code: str, example: Path) -> float:
    """Seconds from a fresh process's start (after the interpreter) to the end of ``code``, timed like
    step_clock.py times a trainer."""
    prog = f"import time\nT0 = time.perf_counter()\n{code}\nprint(time.perf_counter() - T0)"
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                         cwd=example / "examples" / "text_to_image")
    if res.returncode:
        raise SystemExit(f"the example's imports failed: {res.stderr.strip()[-500:]}")
    return round(float(res.stdout.strip().splitlines()[-1]), 2)


def startup_comparison(model: Path, work: Path, example: Path | None, rounds: int) -> dict:
    from synthetic.dataset import generate_dataset

    data = generate_dataset(work / "data2k", n=2000, seed=0)
    ours = ["-m", "pipeline.cli", "train", f"model.pretrained={model}", f"data.path={data}", "train.batch_size=16",
            "train.max_steps=1000", "train.warmup_steps=0", "train.mixed_precision=no", "data.flip=true",
            "logging.sample_every=0", "checkpoint.every=100000", "train.learning_rate=1e-4"]
    lora = ["train.what=lora", "lora.rank=4", "lora.alpha=4", "lora.target_modules=[to_k,to_q,to_v,to_out.0]"]
    peers = {"ours_lazy_cache": ours + [f"output_dir={work / 'o1'}", "train.cache_fill=lazy"],
             "ours_upfront_cache": ours + [f"output_dir={work / 'o2'}", "train.cache_fill=upfront"],
             "ours_lora_lazy_cache": ours + lora + [f"output_dir={work / 'o3'}", "train.cache_fill=lazy"],
             "ours_lora_upfront_cache": ours + lora + [f"output_dir={work / 'o4'}", "train.cache_fill=upfront"]}
    commit, floor_code, example_missing = None, None, None
    if example is not None:
        script = example / "examples" / "text_to_image" / "train_text_to_image.py"
        for name in (script, script.with_name("train_text_to_image_lora.py")):
            if not name.is_file():
                raise SystemExit(f"--example {example}: no examples/text_to_image/{name.name} there")
        commit = subprocess.run(["git", "-C", str(example), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True, text=True)
        floor_code = example_imports(script, without_torchvision=probe.returncode != 0)
        if probe.returncode != 0:  # the example's data pipeline; PyPI's torchvision wheels are CUDA builds
            example_missing = ("the diffusers example needs torchvision built for this torch "
                               f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'not importable'}); "
                               "benchmarks/peer_env.sh makes an environment where it runs")
            print(f"{example_missing}: only its imports are timed", flush=True)
        else:
            common = [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
                      "--resolution=64", "--train_batch_size=16", "--max_train_steps=1000", "--learning_rate=1e-4",
                      "--lr_warmup_steps=0", "--mixed_precision=no", "--random_flip", "--dataloader_num_workers=0",
                      "--checkpointing_steps=100000", "--report_to=tensorboard"]
            peers["diffusers_example"] = [str(script), *common, f"--output_dir={work / 'ex'}"]
            peers["diffusers_example_lora"] = [str(script.with_name("train_text_to_image_lora.py")), *common,
                                               "--rank=4", f"--output_dir={work / 'ex_lora'}"]
    runs: dict[str, list[dict]] = {k: [] for k in peers}
    floors: list[float] = []
    for r in range(rounds):
        for name, cmd in peers.items():
            runs[name].append(clocked(name, cmd, work))
            print(f"round {r + 1} {name:24s} first step {runs[name][-1]['first_step_s']:5.1f} s, "
                  f"{runs[name][-1]['images_per_s']:5.1f} img/s", flush=True)
        if floor_code is not None:
            floors.append(time_imports(floor_code, example))
            print(f"round {r + 1} the example's imports alone {floors[-1]:5.1f} s", flush=True)
    summary = {k: {"script": Path(peers[k][0]).name if k not in PAIRS else "t2i train",
                   "trains": "LoRA rank 4 (attention)" if "lora" in k else "full UNet",
                   "first_step_s": statistics.median(x["first_step_s"] for x in v),
                   "images_per_s": statistics.median(x["images_per_s"] for x in v), "runs": v} for k, v in runs.items()}
    out = {"images": 2000, "flip": True, "steps_clocked": CLOCK_STEPS, "steady_state_window": [CLOCK_STEPS // 2, CLOCK_STEPS],
           "diffusers_example_commit": commit, "results": summary}
    if floors:  # the example cannot reach its first step before its own imports are done
        out["diffusers_example_imports_s"] = {"median": round(statistics.median(floors), 2), "runs": floors,
                                              "without": "torchvision" if example_missing else None,
                                              "example_not_run": example_missing}
        out["startup_vs_example_imports"] = {k: round(summary[k]["first_step_s"] / statistics.median(floors), 2)
                                             for k, peer in PAIRS.items() if peer == "diffusers_example"}
    if "diffusers_example" in summary:  # each of ours against the example training the same parameters
        out["ratios_vs_example"] = {}
        for k, peer in PAIRS.items():
            v, ex = summary[k], summary[peer]
            out["ratios_vs_example"][k] = {"peer": ex["script"],
                                           "startup": round(v["first_step_s"] / ex["first_step_s"], 2),
                                           "steady_state": round(v["images_per_s"] / ex["images_per_s"], 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json", help="JSON output")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--example", type=Path, default=None,
                    help="a diffusers git checkout: its train_text_to_image.py and train_text_to_image_lora.py "
                         "examples are run as peers")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the start-up comparison")
    ap.add_argument("--startup-only", action="store_true",
                    help="only the start-up comparison (written to --out; the throughput table is skipped)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_preset("tiny", work / "tiny")
        data = generate_dataset(work / "data", n=512, seed=0)
        up = "train.cache_fill=upfront"  # steady state after caching
        settings = [("cache_fp32", ["train.cache=true", "train.mixed_precision=no", up]),
                    ("nocache_fp32", ["train.cache=false", "train.mixed_precision=no"]),
                    ("cache_bf16", ["train.cache=true", "train.mixed_precision=bf16", up]),
                    ("nocache_bf16", ["train.cache=false", "train.mixed_precision=bf16"])]
        if args.startup_only:
            settings = []
        results = {n: measure(model, data, work, n, o, args.steps, args.warmup) for n, o in settings}
        startup = startup_comparison(model, work, args.example, args.rounds)
    if args.startup_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"benchmark": "train_startup", "torch": torch.__version__,
                              "startup_and_steady_state": startup})
        print(json.dumps({k: startup.get(k) for k in ("startup_vs_example_imports", "ratios_vs_example")}, indent=2))
        return
    r = {k: v["images_per_s"] for k, v in results.items()}
    out = {
        "benchmark": "train_throughput", "preset": "tiny", "batch_size": 16, "resolution": 64,
        "what": "full UNet, VAE and text encoder frozen", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "results": results,
        "ratios": {"cache_speedup_fp32": round(r["cache_fp32"] / r["nocache_fp32"], 2),
                   "cache_speedup_bf16": round(r["cache_bf16"] / r["nocache_bf16"], 2),
                   "bf16_speedup_cached": round(r["cache_bf16"] / r["cache_fp32"], 2)},
        "startup_and_steady_state": startup,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    print(json.dumps(out["ratios"], indent=2))
    print(json.dumps(startup.get("ratios_vs_example", {}), indent=2))
    for k, v in results.items():
        print(f"{k:14s} {v['images_per_s']:7.1f} img/s  ({v['median_step_s'] * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
