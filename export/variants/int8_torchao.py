"""int8 with torchao ``quantize_`` on the linear layers of the UNet and text encoder:
dynamic activation + int8 weight (default), or weight-only. Convolutions stay fp32 (torchao
quantizes nn.Linear).

Saved as safetensors through torchao's tensor-subclass flattening: each quantized weight becomes
its plain tensors (int8 data, scales) plus a JSON description naming its class, which must be one
of torchao's allow-listed tensor types; loading rebuilds the quantized tensors from those, so no
pickle is read."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.errors import UserError
from export.common import copy_shared, empty_parts, load_torch_parts, read_part, save_part, torch_generator, write_meta

WEIGHTS = "torchao_int8.safetensors"


def _config(mode: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()


def _check_types(value, allowed: set[str], where: str) -> None:
    """Every ``_type`` in torchao's JSON description is an allow-listed class or a real torch dtype."""
    if isinstance(value, dict):
        kind = value.get("_type")
        if kind == "torch.dtype":
            if not isinstance(getattr(torch, str(value.get("_data")), None), torch.dtype):
                raise UserError(f"{where}: {value.get('_data')!r} is not a torch dtype; re-run `t2i export`")
        elif kind is not None and kind not in allowed:
            raise UserError(f"{where}: tensor type {kind!r} is not one torchao rebuilds; re-run `t2i export`")
        for v in value.values():
            _check_types(v, allowed, where)
    elif isinstance(value, list):
        for v in value:
            _check_types(v, allowed, where)


def rebuild_state(tensors: dict, metadata: dict, where: str) -> dict:
    """The state dict (torchao tensor subclasses included) from safetensors tensors + metadata."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_CLASSES

    try:
        described = {k: json.loads(v) for k, v in metadata.items()}
    except ValueError:
        raise UserError(f"{where}: its metadata is not JSON; re-run `t2i export`") from None
    _check_types(described, set(ALLOWED_CLASSES) | {"Tensor"}, where)
    try:
        state, left = unflatten_tensor_state_dict(tensors, metadata)
    except Exception as e:  # noqa: BLE001 - a malformed description, whatever torchao raises
        raise UserError(f"{where}: cannot rebuild the quantized weights ({type(e).__name__}: {str(e)[:120]}); "
                        "re-run `t2i export`") from None
    if left:
        raise UserError(f"{where}: {len(left)} tensors are not described by its metadata; re-run `t2i export`")
    return state


class TorchAOInt8:
    TOLERANCE = 12.0

    def __init__(self, mode: str):
        self.mode = mode

    def unsupported(self, device: str) -> str | None:
        try:
            import torchao  # noqa: F401
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict  # noqa: F401
        except Exception as e:
            return f"torchao (with safetensors support, 0.14 or later) does not import here: {e}"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        from torchao.quantization import quantize_

        te, unet, vae = load_torch_parts(model_dir)
        copy_shared(model_dir, out_dir)
        for name, module in (("text_encoder", te), ("unet", unet)):
            quantize_(module, _config(self.mode))
            tensors, metadata = flatten_tensor_state_dict(module.state_dict())
            save_part(out_dir, name, module, tensors, WEIGHTS, metadata)
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        write_meta(model_dir, out_dir, torchao_mode=self.mode)
        return {"format": "torchao tensors in safetensors", "mode": self.mode, "quantized": ["unet", "text_encoder"]}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        from diffusers import AutoencoderKL

        parts = empty_parts(var_dir)
        for name, module in parts.items():
            tensors, metadata = read_part(var_dir, name, WEIGHTS, device)
            state = rebuild_state(tensors, metadata, str(var_dir / name / WEIGHTS))
            try:
                module.load_state_dict(state, assign=True)
            except RuntimeError as e:
                raise UserError(f"{var_dir / name / WEIGHTS} does not fit the {name} config "
                                f"({str(e).splitlines()[0][:120]}); re-run `t2i export`") from None
            module.to(device).eval()
        vae = AutoencoderKL.from_pretrained(var_dir / "vae", use_safetensors=True).to(device).eval()
        return torch_generator(var_dir, parts["text_encoder"], parts["unet"], vae, torch.float32, device,
                               {"variant": f"int8-torchao ({self.mode})"})
