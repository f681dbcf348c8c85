"""int8 with bitsandbytes LLM.int8 (Dettmers et al. 2022): every nn.Linear of the UNet and text
encoder becomes ``bnb.nn.Linear8bitLt`` (outlier threshold 6.0). diffusers' BitsAndBytesConfig
refuses to quantize without a GPU, so the layers are swapped directly; bitsandbytes 0.50 runs
them on CPU too. The int8 weights and their scales (SCB) are plain tensors, saved as safetensors and
copied into freshly swapped layers at load."""
from __future__ import annotations

from pathlib import Path

import torch

from core.errors import UserError
from export.common import copy_shared, empty_parts, load_torch_parts, read_part, save_part, torch_generator, write_meta

WEIGHTS = "bnb_int8.safetensors"


def swap_linears(module: torch.nn.Module) -> int:
    """Replaces nn.Linear children (recursively) by Linear8bitLt holding int8 weights."""
    import bitsandbytes as bnb

    n = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, q)
            n += 1
        else:
            n += swap_linears(child)
    return n


class BnbInt8:
    TOLERANCE = 12.0

    def unsupported(self, device: str) -> str | None:
        try:
            import bitsandbytes as bnb

            layer = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(torch.randn(8, 8), requires_grad=False, has_fp16_weights=False)
            layer = layer.to(device)
            layer(torch.randn(2, 8, device=device))
        except Exception as e:
            return f"bitsandbytes int8 does not run on {device} here: {type(e).__name__}: {str(e)[:160]}"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        te, unet, vae = load_torch_parts(model_dir)
        copy_shared(model_dir, out_dir)
        counts = {}
        for name, module in (("text_encoder", te), ("unet", unet)):
            counts[name] = swap_linears(module)
            module.to(device)  # bitsandbytes quantizes when the weights move to the device
            save_part(out_dir, name, module, module.state_dict(), WEIGHTS)
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        write_meta(model_dir, out_dir)
        return {"format": "bitsandbytes Linear8bitLt tensors in safetensors", "linear_layers": counts}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        from diffusers import AutoencoderKL

        parts = empty_parts(var_dir)
        te, unet = parts["text_encoder"], parts["unet"]
        for name, module in parts.items():
            swap_linears(module)
            module.to(device)
            tensors, _ = read_part(var_dir, name, WEIGHTS, device)
            try:
                module.load_state_dict(tensors)
            except RuntimeError as e:
                raise UserError(f"{var_dir / name / WEIGHTS} does not fit the {name} config "
                                f"({str(e).splitlines()[0][:120]}); re-run `t2i export`") from None
            module.eval()
        vae = AutoencoderKL.from_pretrained(var_dir / "vae", use_safetensors=True).to(device).eval()
        return torch_generator(var_dir, te, unet, vae, torch.float32, device, {"variant": "int8-bnb"})
