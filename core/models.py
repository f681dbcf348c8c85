"""Finding and reading a diffusers model dir: where it is, its sizes, its parts.

A model dir is a standard Stable Diffusion pipeline folder (``model_index.json`` + ``unet/ vae/
text_encoder/ tokenizer/ scheduler/``); a hub id works too where the machine is online.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from core.errors import UserError
from core.io import atomic_write, write_json


def resolve_model(model: str) -> tuple[str, bool]:
    """Returns (path or hub id, is_local). A missing local path is a clear error."""
    p = Path(model)
    if p.exists():
        if not (p / "model_index.json").exists():
            raise UserError(f"{model} is not a diffusers model dir (no model_index.json)")
        return str(p), True
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model dir {model} does not exist (and is not a hub id like 'org/name')")
    return model, False


def vae_scale(vae_config) -> int:
    """Pixels per latent cell along a side (8 for SD's VAE, 4 for the tiny preset's)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_factor(vae_config, unet_config) -> int:
    """Image sides must be multiples of this: the VAE's and the UNet's downsampling, and diffusers'
    pipelines want multiples of 8."""
    return math.lcm(8, vae_scale(vae_config) * 2 ** (len(unet_config["block_out_channels"]) - 1))


MAX_SIDE_MULTIPLE = 2
"""The largest image side a model is offered at, as a multiple of its native side: the ONNX graphs are
exported for and checked at it, and serving refuses larger (memory and latency grow with the area)."""


def side_range(native_size: int, factor: int) -> tuple[int, int]:
    """(smallest, largest) image side offered: half to twice the native side, in multiples of ``factor``."""
    lo = native_size // 2 // factor * factor
    hi = MAX_SIDE_MULTIPLE * native_size // factor * factor
    return max(factor, lo), max(factor, hi)


def check_size(width: int, height: int, min_size: int, max_size: int, factor: int, label: str = "size") -> None:
    """A one-line UserError unless both sides are multiples of ``factor`` in [min_size, max_size]."""
    if any(side % factor or not min_size <= side <= max_size for side in (width, height)):
        raise UserError(f"{label} {width}x{height} is not supported by this model: width and height must be "
                        f"multiples of {factor} from {min_size} to {max_size}")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def model_meta(model_dir: Path) -> dict:
    """Sizes the sampling loop needs, read from the configs (no weights loaded)."""
    model_dir = Path(model_dir)
    vae = read_json(model_dir / "vae" / "config.json")
    unet = read_json(model_dir / "unet" / "config.json")
    scale, factor = vae_scale(vae), size_factor(vae, unet)
    native = unet["sample_size"] * scale
    lo, hi = side_range(native, factor)
    return {"vae_scale": scale, "latent_channels": vae["latent_channels"],
            "scaling_factor": vae.get("scaling_factor", 0.18215), "native_size": native,
            "size_factor": factor, "min_size": lo, "max_size": hi}


def scheduler_config(model_dir: Path) -> dict:
    return read_json(Path(model_dir) / "scheduler" / "scheduler_config.json")


def load_tokenizer(model_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(Path(model_dir) / "tokenizer")


def load_torch_parts(model_dir: Path, dtype=None, device="cpu", unet: bool = True):
    """Text encoder, UNet and VAE of a model dir in ``dtype`` (default fp32) on ``device``, in eval mode;
    ``unet=False``: the UNet's config instead of the UNet (a variant that runs its own UNet graph)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = dtype or torch.float32
    model_dir = Path(model_dir)
    try:
        # safetensors only: a .bin weight file is a pickle, and unpickling can run code
        te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=dtype, use_safetensors=True)
        te, vae = te.to(device).eval(), vae.to(device).eval()
        if unet:
            unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", dtype=dtype, use_safetensors=True)
            unet = unet.to(device).eval()
        else:
            from diffusers.configuration_utils import FrozenDict

            unet = FrozenDict(UNet2DConditionModel.load_config(model_dir / "unet"))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load model {model_dir}: {first}") from None
    return te, unet, vae


# transformers 4.x names CLIPTextModel's weights "text_model.embeddings...", as every SD 1.x/2.x checkpoint
# on the hub does; transformers 5 dropped the prefix in memory and reads both, but writes a model it did
# not load from a prefixed file without it, which 4.x then fails to match (it warns and initialises the
# encoder randomly). The dtype the pipeline runs in: diffusers loads the UNet and VAE in fp32 by default.
TEXT_MODEL_PREFIX = "text_model."
RUN_DTYPE = "float32"


def standardize_text_encoder(folder: Path) -> None:
    """Rewrites a saved ``CLIPTextModel`` folder in place into the layout every transformers version
    loads with default arguments: weight names in the hub's ``text_model.*`` layout, and a config
    whose ``dtype`` is the one the UNet and VAE load in (fp32), whatever dtype the weights are stored
    in (transformers 5 loads in the config's dtype, 4.x in fp32). Other text-encoder classes are left alone."""
    from safetensors import safe_open
    from safetensors.torch import save

    folder = Path(folder)
    config = read_json(folder / "config.json")
    if config.get("architectures") != ["CLIPTextModel"]:
        return
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if all(k.startswith(TEXT_MODEL_PREFIX) for k in tensors):
            continue
        renamed = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in tensors.items()}
        atomic_write(path, save(renamed, metadata={"format": "pt"}))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        data["weight_map"] = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v
                              for k, v in data.get("weight_map", {}).items()}
        write_json(index, data)
    config.pop("torch_dtype", None)
    config["dtype"] = RUN_DTYPE
    write_json(folder / "config.json", config)


def default_device() -> str:
    """cuda where available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
