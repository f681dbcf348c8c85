"""torch.compile (Inductor) of the UNet and the VAE decoder, on top of another variant's weights
(eager-fp32 or int8-torchao). Build warms up every batch size the service will use and saves
Inductor's compiled artifacts (``torch.compiler.save_cache_artifacts``) into the folder, so a fresh
process loads them instead of compiling from scratch (the benchmark reports both starts)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from core.sampling import GenerationRequest

CACHE_FILE = "inductor_cache.bin"


def _compile(gen) -> None:
    be = gen.backend
    be.unet_model = torch.compile(be.unet_model, dynamic=False)
    be.vae.decode = torch.compile(be.vae.decode, dynamic=False)


def warm_up(gen, batch_sizes: list[int], steps: int = 2) -> float:
    t0 = time.perf_counter()
    for b in batch_sizes:
        gen.generate([GenerationRequest("warm up", num_inference_steps=steps, seed=i) for i in range(b)])
    return time.perf_counter() - t0


class Compiled:
    def __init__(self, base: str):
        self.base = base
        self.TOLERANCE = 2.0 if base == "eager-fp32" else 12.0

    def _base(self):
        from export.variants import REGISTRY

        return REGISTRY[self.base]

    def unsupported(self, device: str) -> str | None:
        reason = self._base().unsupported(device)
        if reason:
            return f"its base {self.base} is unsupported: {reason}"
        if device == "cpu" and not shutil.which("g++") and not shutil.which("c++"):
            return "Inductor on CPU needs a C++ compiler (g++), and none is installed"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        notes = self._base().build(model_dir, out_dir, device, ctx)
        torch.compiler.reset()
        gen = self._base().load(out_dir, device)
        _compile(gen)
        cold = warm_up(gen, ctx.get("batch_sizes", [1]))
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            (out_dir / CACHE_FILE).write_bytes(saved[0])
        (out_dir / "compile.json").write_text(__import__("json").dumps(
            {"base": self.base, "batch_sizes": ctx.get("batch_sizes", [1])}))
        return {**notes, "base": self.base, "cold_compile_s": round(cold, 1),
                "cache_bytes": len(saved[0]) if saved else 0}

    def load(self, var_dir: Path, device: str):
        import json

        cache = var_dir / CACHE_FILE
        if cache.exists():
            torch.compiler.load_cache_artifacts(cache.read_bytes())
        gen = self._base().load(var_dir, device)
        _compile(gen)
        batch_sizes = json.loads((var_dir / "compile.json").read_text())["batch_sizes"]
        gen.info = {"variant": f"compile ({self.base})", "warm_start_s": round(warm_up(gen, batch_sizes), 1)}
        return gen
