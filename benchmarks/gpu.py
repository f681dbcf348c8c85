"""GPU benchmark: an SD1.5-shaped pipeline (random weights: timing only) trained and exported on an
NVIDIA GPU, written as JSON.

  1. builds the `sd15-shape` preset (860 M-parameter UNet, 8x VAE, 512x512);
  2. times training steps: LoRA (bf16) and full UNet (bf16, 8-bit AdamW, gradient checkpointing),
     images/s and peak GPU memory;
  3. runs `t2i export` with every variant (fp32/fp16/bf16 eager, torchao and bitsandbytes int8,
     torch.compile, ONNX Runtime fp32/fp16/int8): latency per image at batch 1 and 4 and the ratios
     to eager-fp32, measured in the same run.

    .venv/bin/python benchmarks/gpu.py --out benchmarks/results/gpu.json       (needs CUDA)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cli(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"t2i {args[0]} failed:\n{res.stderr[-4000:]}")
    return res


def train(model: Path, data: Path, work: Path, name: str, steps: int, overrides: list[str]) -> dict:
    out = work / name
    t0 = time.time()
    cli("train", str(ROOT / "configs" / "sd15-lora.yaml"), f"model.pretrained={model}", f"data.path={data}",
        f"output_dir={out}", f"train.max_steps={steps}", "train.warmup_steps=0", "logging.sample_every=0",
        "logging.sample_steps=2", "checkpoint.every=100000", "train.grad_accum=1", *overrides)
    report = json.loads((out / "train_report.json").read_text())
    return {"steps": report["steps"], "images_per_s": report["images_per_s"], "wall_s": round(time.time() - t0, 1),
            "peak_gpu_mem_gb": report.get("peak_gpu_mem_gb"), "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--work", help="scratch folder (default: a temp dir)")
    p.add_argument("--skip-train", action="store_true")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        raise SystemExit(2)
    from synthetic.dataset import generate_dataset
    from training.presets import build_preset

    work = Path(a.work or tempfile.mkdtemp(prefix="t2i-gpu-"))
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.time()
    model = build_preset("sd15-shape", work / "sd15-shape") if not (work / "sd15-shape").exists() else work / "sd15-shape"
    result["build_s"] = round(time.time() - t0, 1)
    data = work / "data"
    if not data.exists():
        generate_dataset(data, n=256, seed=0, size=512)
    if not a.skip_train:
        result["train"] = {
            "lora_bf16_b4": train(model, data, work, "lora", a.train_steps, ["train.batch_size=4"]),
            "full_bf16_adamw8bit_ckpt_b4": train(model, data, work, "full", a.train_steps, [
                "train.what=unet", "train.batch_size=4", "train.optimizer=adamw8bit",
                "train.gradient_checkpointing=true"]),
        }
    exp = work / "export"
    cli("export", str(model), "--out", str(exp), "--variants", "eager-fp32,eager-fp16,eager-bf16,int8-torchao,"
        "int8-torchao-wo,int8-bnb,compile,onnx-fp32,onnx-fp16,onnx-int8", "--num-images", "16", "--repeats", "3",
        "--batch-sizes", "1,4", "--steps", "20", "--max-fid-drift", "1000", "--max-adherence-drop", "100",
        "--device", "cuda")
    manifest = json.loads((exp / "export.json").read_text())
    base = manifest["variants"]["eager-fp32"]["bench"]["latency"]
    result["export"] = {
        n: ({"status": "ok", **{f"ms_per_image_b{b}": round(1000 * e["bench"]["latency"][b]["median_s"], 1)
                               for b in e["bench"]["latency"]},
             **{f"speedup_b{b}": round(base[b]["median_s"] / e["bench"]["latency"][b]["median_s"], 2)
                for b in e["bench"]["latency"]},
             "load_s": e["bench"]["load_s"], "warmup_s": e["bench"]["warmup_s"], "size_mb": e.get("size_mb"),
             "psnr_db_vs_fp32": e.get("quality", {}).get("psnr_db_median")}
            if e["status"] == "ok" else {"status": e["status"], "reason": e.get("reason")})
        for n, e in manifest["variants"].items()}
    result["export_selected"] = manifest["selected"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
