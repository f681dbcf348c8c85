"""int8 with torchao ``quantize_`` on the linear layers of the UNet and text encoder:
dynamic activation + int8 weight (default), or weight-only. Convolutions stay fp32 (torchao
quantizes nn.Linear). Saved as torchao state dicts (torch.save), re-quantized structure on load."""
from __future__ import annotations

from pathlib import Path

import torch

from export.common import copy_shared, empty_parts, load_torch_parts, save_quantized, torch_generator, write_meta


def _config(mode: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()


class TorchAOInt8:
    TOLERANCE = 12.0

    def __init__(self, mode: str):
        self.mode = mode

    def unsupported(self, device: str) -> str | None:
        try:
            import torchao  # noqa: F401
        except Exception as e:
            return f"torchao does not import here: {e}"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        from torchao.quantization import quantize_

        te, unet, vae = load_torch_parts(model_dir)
        copy_shared(model_dir, out_dir)
        for module in (te, unet):
            quantize_(module, _config(self.mode))
        save_quantized(out_dir, {"text_encoder": te, "unet": unet}, "torchao_int8.pt")
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        write_meta(model_dir, out_dir, torchao_mode=self.mode)
        return {"format": "torchao state dict", "mode": self.mode, "quantized": ["unet", "text_encoder"]}

    def load(self, var_dir: Path, device: str):
        from diffusers import AutoencoderKL
        from torchao.quantization import quantize_

        parts = empty_parts(var_dir)
        te, unet = parts["text_encoder"], parts["unet"]
        for name, module in parts.items():
            quantize_(module, _config(self.mode))
            state = torch.load(var_dir / name / "torchao_int8.pt", weights_only=False, map_location=device)
            module.load_state_dict(state, assign=True)
            module.to(device).eval()
        vae = AutoencoderKL.from_pretrained(var_dir / "vae").to(device).eval()
        return torch_generator(var_dir, te, unet, vae, torch.float32, device,
                               {"variant": f"int8-torchao ({self.mode})"})
