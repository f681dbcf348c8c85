"""Dynamic vs static shapes of the ONNX UNet and VAE decoder, on ONNX Runtime (CPU), written as JSON.

The onnx-* variants export with dynamic batch, height and width, so one folder serves every size it
offers. This measures what that costs against graphs with a fixed image size (batch still dynamic,
as the earlier export was) and a fully static graph (batch fixed too), at the native size:

    .venv/bin/python benchmarks/onnx_shapes.py                       # the shipped base, models/tiny-base
    .venv/bin/python benchmarks/onnx_shapes.py --model runs/demo/train/model --runs 50

The graphs are timed in interleaved rounds (each round runs every graph once) so that the noise of
a shared machine falls on all of them alike; the medians and their ratios are what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.models import load_torch_parts, model_meta  # noqa: E402
from core.quiet import quiet_libraries  # noqa: E402
from export.variants.onnx import _export, _parts, _session  # noqa: E402

NETWORKS = ("unet", "vae_decoder")


def export_all(model: Path, work: Path, static_batch: int) -> dict[str, dict[str, Path]]:
    """{shape kind: {network: model.onnx}} for dynamic (batch, height, width), static size (batch
    dynamic) and static (batch ``static_batch`` too)."""
    te, unet, vae = load_torch_parts(model)
    max_size = model_meta(model)["max_size"]
    kinds = {"dynamic": _parts(te, unet, vae, max_size), "static_size": _parts(te, unet, vae, max_size, False)}
    paths: dict[str, dict[str, Path]] = {k: {} for k in (*kinds, "static")}
    for kind, parts in kinds.items():
        for name in NETWORKS:
            mod, examples, ins, outs, shapes = parts[name]
            paths[kind][name] = work / kind / name / "model.onnx"
            _export(mod, examples[0], ins, outs, shapes, paths[kind][name])
            if kind == "static_size":
                b = decoder_batch(name, static_batch)
                fixed = tuple(a[:1].expand(b, *a.shape[1:]).contiguous() for a in examples[0])
                paths["static"][name] = work / "static" / name / "model.onnx"
                _export(mod, fixed, ins, outs, None, paths["static"][name])
    return paths


def decoder_batch(name: str, unet_batch: int) -> int:
    """The decoder sees one latent per image: half the UNet's guided batch."""
    return max(1, unet_batch // 2) if name == "vae_decoder" else unet_batch


def feeds(name: str, batch: int, meta: dict, hidden: int) -> dict:
    lat = meta["native_size"] // meta["vae_scale"]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, meta["latent_channels"], lat, lat), dtype=np.float32)
    if name == "vae_decoder":
        return {"latent_sample": sample}
    return {"sample": sample, "timestep": np.full((batch,), 500, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, hidden), dtype=np.float32)}


def time_round_robin(sessions: dict, inputs: dict, runs: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + runs):
        for kind, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, inputs)
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-base", help="diffusers model dir")
    ap.add_argument("--out", default="benchmarks/results/onnx_shapes.json", help="JSON output")
    ap.add_argument("--batches", default="2,8", help="UNet batch sizes (2 = one image with guidance)")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per graph and batch size")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    quiet_libraries()
    model = Path(args.model)
    meta = model_meta(model)
    hidden = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_all(model, Path(tmp), batches[0])
        for name in NETWORKS:
            for b in batches:
                nb = decoder_batch(name, b)
                kinds = [k for k in paths if k != "static" or b == batches[0]]
                sessions = {k: _session(paths[k][name], "cpu") for k in kinds}
                med = time_round_robin(sessions, feeds(name, nb, meta, hidden), args.runs, args.warmup)
                row = {"network": name, "batch": nb, "size": f"{meta['native_size']}x{meta['native_size']}",
                       "median_ms": {k: round(v * 1000, 3) for k, v in med.items()},
                       "dynamic_vs": {k: round(med["dynamic"] / v, 3) for k, v in med.items() if k != "dynamic"}}
                results.append(row)
                print(json.dumps(row))
    out = {"model": str(model), "runs": args.runs, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "onnxruntime": __import__("onnxruntime").__version__,
           "note": "dynamic_vs: dynamic latency / other latency (above 1: the dynamic graph is slower)",
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
