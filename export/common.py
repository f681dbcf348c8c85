"""What the variant modules share: reading a model dir's non-network parts, the Generator
over torch modules; and the benchmark's yardsticks (latency statistics, UNet FLOPs, matmul peak)."""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from core.errors import UserError
from core.io import read_json_file, read_safetensors, write_safetensors
from core.models import load_tokenizer, load_torch_parts, model_meta, scheduler_config  # noqa: F401
from core.sampling import Generator, TorchBackend

# Parts of a diffusers model dir that every variant copies unchanged.
SHARED_PARTS = ("tokenizer", "scheduler")


def copy_shared(model_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in SHARED_PARTS:
        shutil.copytree(model_dir / part, out_dir / part, dirs_exist_ok=True)
    for extra in ("model_index.json", "t2i_train.yaml"):
        if (model_dir / extra).exists():
            shutil.copy(model_dir / extra, out_dir / extra)


def make_generator(var_dir: Path, backend, info: dict | None = None) -> Generator:
    meta_src = var_dir / "meta.json"
    meta = (read_json_file(meta_src, "variant metadata", "re-run `t2i export`") if meta_src.exists()
            else model_meta(var_dir))
    return Generator(backend, load_tokenizer(var_dir), scheduler_config(var_dir), meta["vae_scale"],
                     meta["latent_channels"], meta["scaling_factor"], meta["native_size"], info,
                     meta.get("size_factor"), meta.get("min_size"), meta.get("max_size"))


def torch_generator(var_dir: Path, te, unet, vae, dtype, device, info=None) -> Generator:
    return make_generator(var_dir, TorchBackend(te, unet, vae, dtype, device), info)


def write_meta(model_dir: Path, out_dir: Path, **extra) -> None:
    (out_dir / "meta.json").write_text(json.dumps({**model_meta(model_dir), **extra}, indent=2))


def dir_size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 2)


def save_part(out_dir: Path, name: str, module, tensors: dict, filename: str, metadata: dict | None = None) -> None:
    """A part's config plus its (quantized) weights as safetensors: ``tensors`` and ``metadata`` are
    the state dict flattened to plain tensors and JSON (see the int8 variants)."""
    (out_dir / name).mkdir()
    if name == "text_encoder":
        module.config.to_json_file(out_dir / name / "config.json")
    else:
        module.save_config(out_dir / name)
    write_safetensors(out_dir / name / filename, tensors, metadata)


def read_part(var_dir: Path, name: str, filename: str, device: str = "cpu") -> tuple[dict, dict]:
    """(tensors, metadata) that ``save_part`` wrote; a pickled file of an older export is refused."""
    path = var_dir / name / filename
    if not path.exists() and path.with_suffix(".pt").exists():
        raise UserError(f"{path.with_suffix('.pt')} is a pickle (written by an older t2i export), which is never "
                        "loaded because unpickling can run code; re-run `t2i export`")
    return read_safetensors(path, device, remedy="re-run `t2i export`")


def empty_parts(var_dir: Path) -> dict:
    """Text encoder and UNet built from their configs, weights to be filled by load_state_dict."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        return {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(var_dir / "text_encoder")),
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(var_dir / "unet"))}
    except (OSError, ValueError) as e:
        raise UserError(f"{var_dir} is not a complete variant folder ({str(e).splitlines()[0][:160]}); "
                        "re-run `t2i export`") from None


def latency_stats(per_image: list[float], unet_step_ms: float, processes: int = 1) -> dict:
    """The Latency fields of some timed runs' seconds per image (``repeats_s`` keeps them all, so the
    export can pool them with re-timing rounds run in other processes)."""
    per_image = sorted(per_image)
    return {
        "median_s": round(statistics.median(per_image), 4),
        "p95_s": round(per_image[min(len(per_image) - 1, int(round(0.95 * (len(per_image) - 1))))], 4),
        "min_s": round(per_image[0], 4),
        "unet_step_ms": round(unet_step_ms, 3),
        "repeats_s": [round(t, 4) for t in per_image],
        "processes": processes,
    }


def unet_flops(model_dir: Path, batch: int = 2) -> float:
    """FLOPs of one UNet call at the guided batch size (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    te, unet, _ = load_torch_parts(model_dir)
    s = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, s, s)
    emb = torch.randn(batch, te.config.max_position_embeddings, te.config.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor(500), emb)
    return float(fc.get_total_flops())


def matmul_peak_gflops(n: int = 1024, dtype=None, device: str = "cpu") -> float:
    """fp32 (or ``dtype``) matmul throughput on ``device``: the yardstick of each variant's UNet GFLOP/s."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    reps = 10 if device == "cpu" else 100
    for _ in range(reps):
        a @ b
    sync()
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9, 1)
