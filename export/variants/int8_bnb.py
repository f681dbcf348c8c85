"""int8 with bitsandbytes LLM.int8 (Dettmers et al. 2022): every nn.Linear of the UNet and text
encoder becomes ``bnb.nn.Linear8bitLt`` (outlier threshold 6.0). diffusers' BitsAndBytesConfig
refuses to quantize without a GPU, so the layers are swapped directly; bitsandbytes 0.50 runs
them on CPU too."""
from __future__ import annotations

from pathlib import Path

import torch

from export.common import copy_shared, empty_parts, load_torch_parts, save_quantized, torch_generator, write_meta


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
        save_quantized(out_dir, {"text_encoder": te, "unet": unet}, "bnb_int8.pt")
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        write_meta(model_dir, out_dir)
        return {"format": "bitsandbytes Linear8bitLt state dict", "linear_layers": counts}

    def load(self, var_dir: Path, device: str):
        from diffusers import AutoencoderKL

        parts = empty_parts(var_dir)
        te, unet = parts["text_encoder"], parts["unet"]
        for name, module in parts.items():
            swap_linears(module)
            module.to(device)
            module.load_state_dict(torch.load(var_dir / name / "bnb_int8.pt", weights_only=False,
                                              map_location=device))
            module.eval()
        vae = AutoencoderKL.from_pretrained(var_dir / "vae").to(device).eval()
        return torch_generator(var_dir, te, unet, vae, torch.float32, device, {"variant": "int8-bnb"})
