"""torch.compile (Inductor) of the UNet and the VAE decoder, on top of another variant's weights
(eager-fp32 or int8-torchao). Build warms up every batch size the service will use and saves
Inductor's compiled artifacts (``torch.compiler.save_cache_artifacts``) into the folder, so a fresh
process loads them instead of compiling from scratch (the benchmark reports both starts).

Those artifacts are pickles and compiled kernels: loading them runs code. They load only through
``export.trust`` (a hash manifest written at build; built on this machine, or --trusted-artifacts).
Without the cache file the variant compiles from scratch, which runs only code torch generates."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from core.errors import UserError
from core.sampling import GenerationRequest
from export import trust

CACHE_FILE = "inductor_cache.bin"
CODE_KIND = "an Inductor cache (pickled graphs and compiled kernels)"


ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # UNet rows and decoded images are padded to these sizes


def _bucketed(fn, buckets: list[int]):
    """``fn(x, *rest)`` on inputs padded (the last row repeated) to the next bucket's batch, sliced back:
    a graph compiled for fixed shapes then sees only the buckets' batch sizes."""
    def call(x, *rest):
        n = x.shape[0]
        b = next((b for b in buckets if b >= n), n)
        if b == n:
            return fn(x, *rest)

        def pad(v):
            if torch.is_tensor(v) and v.dim() and v.shape[0] == n:
                return torch.cat([v, v[-1:].expand(b - n, *v.shape[1:])])
            return v
        return fn(pad(x), *(pad(v) for v in rest))[:n]
    return call


def per_row_timestep(timestep: torch.Tensor, rows: int) -> torch.Tensor:
    """One float32 timestep per row (the sampler passes one for all, or one per row; float keeps
    schedulers with fractional timesteps exact, and the UNet embeds integers as floats anyway)."""
    t = timestep.reshape(-1).to(torch.float32)
    return (t.expand(rows) if t.numel() == 1 else t).contiguous()


def _timestep_per_row(unet):
    """``unet(x, t, emb)`` given ``per_row_timestep(t)``, whether the caller passes one timestep for every
    row (the request loop) or one per row (the step engine): each bucket then runs one compiled graph
    instead of one per form, and the images are unchanged."""
    def call(x, t, *rest):
        return unet(x, per_row_timestep(t, x.shape[0]) if torch.is_tensor(t) else t, *rest)
    return call


def _compile(gen) -> None:
    be = gen.backend
    be.unet_model = torch.compile(be.unet_model, dynamic=False)
    be.vae.decode = torch.compile(be.vae.decode, dynamic=False)
    be.row_buckets = ROW_BUCKETS  # what serving warms up (service.py)
    be.unet, be.decode = _timestep_per_row(_bucketed(be.unet, ROW_BUCKETS)), _bucketed(be.decode, ROW_BUCKETS)
    # one graph per bucket (and image size): dynamo's default limit of 8 would fall back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(ROW_BUCKETS))


def warm_up(gen, batch_sizes: list[int], steps: int = 2, max_rows: int = 0) -> float:
    """Runs ``batch_sizes`` whole generations, then the UNet and the decoder once at every bucket up to
    ``max_rows`` (at the native size), so serving compiles nothing inside a request."""
    t0 = time.perf_counter()
    for b in batch_sizes:
        gen.generate([GenerationRequest("warm up", num_inference_steps=steps, seed=i) for i in range(b)])
    side = gen.native_size // gen.vae_scale
    emb = gen.encode(["warm up"])
    with torch.no_grad():
        for b in (b for b in ROW_BUCKETS if b <= max_rows):
            lat = torch.zeros(b, gen.latent_channels, side, side)
            embs = emb.repeat(b, 1, 1)  # contiguous, as the engine's batches are (strides are guarded too)
            gen.backend.unet(lat, torch.full((b,), 500, dtype=torch.long), embs)  # the request loop's too
            gen.backend.decode(lat)
    return time.perf_counter() - t0


class Compiled:
    """``base``: the registry name of the variant whose weights are compiled."""

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
        if not hasattr(torch.compiler, "save_cache_artifacts"):
            return f"torch {torch.__version__} has no torch.compiler.save_cache_artifacts (torch >= 2.7 does)"
        if device == "cpu" and not shutil.which("g++") and not shutil.which("c++"):
            return "Inductor on CPU needs a C++ compiler (g++), and none is installed"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        notes = self._base().build(model_dir, out_dir, device, ctx)
        torch.compiler.reset()
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()  # else the cache file would also carry the graphs built before this variant
        gen = self._base().load(out_dir, device)
        _compile(gen)
        cold = warm_up(gen, ctx.get("batch_sizes", [1]))
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            (out_dir / CACHE_FILE).write_bytes(saved[0])
            trust.record(out_dir, [CACHE_FILE], CODE_KIND)
        (out_dir / "compile.json").write_text(__import__("json").dumps(
            {"base": self.base, "batch_sizes": ctx.get("batch_sizes", [1])}))
        return {**notes, "base": self.base, "cold_compile_s": round(cold, 1),
                "cache_bytes": len(saved[0]) if saved else 0}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        from core.io import read_json_file

        settings = read_json_file(var_dir / "compile.json", "compile settings", "re-run `t2i export`")
        batch_sizes = settings.get("batch_sizes")
        if not (isinstance(batch_sizes, list) and batch_sizes and all(isinstance(b, int) and 0 < b <= 256
                                                                      for b in batch_sizes)):
            raise UserError(f"{var_dir / 'compile.json'} is corrupt (batch_sizes); re-run `t2i export`")
        if (var_dir / CACHE_FILE).exists():  # verified and trusted, or refused, before anything runs
            torch.compiler.load_cache_artifacts(trust.verified_bytes(var_dir, CACHE_FILE, trusted))
        gen = self._base().load(var_dir, device)
        _compile(gen)
        gen.info = {"variant": f"compile ({self.base})",
                    "warm_start_s": round(warm_up(gen, batch_sizes), 1)}
        return gen
