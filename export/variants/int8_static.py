"""int8-static: static int8 of the UNet through PyTorch 2 export quantization (PT2E) and Inductor.

The UNet's convolutions and linear layers get int8 weights (per output channel) and int8 activations
whose ranges were calibrated on the UNet's own inputs while the model sampled (``X86InductorQuantizer``);
Inductor (with freezing) lowers them to oneDNN's int8 kernels, which use VNNI or AMX where the CPU has
them. Unlike int8-torchao (activations quantized per call, in Python-visible ops) and onnx-int8
(MatMuls only; ONNX Runtime's ConvInteger is slower than its fp32 convolution) this quantizes the
convolutions, which are most of a real-size UNet's arithmetic on a CPU. Attention, the norms and the
text encoder and VAE stay fp32.

The folder is eager-fp32's (safetensors) plus ``calibration.safetensors``: the UNet inputs recorded
while the model drew images for a few prompts unlike the gate's (other prompts and seeds). Loading
re-quantizes from those (observers' min/max, deterministic) and compiles through ``compiled.Compiled``,
so nothing in the folder is code; the compiled graphs are cached as the compile variant's are."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from core.errors import UserError
from core.io import read_safetensors, write_safetensors
from core.sampling import GenerationRequest

CALIBRATION = "calibration.safetensors"
CALIBRATION_STEPS = 6  # UNet calls kept per calibration generation, evenly over the steps


class _Call(torch.nn.Module):
    """The UNet as a function of three tensors with one timestep per row (what torch.export traces)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _Quantized(torch.nn.Module):
    """The quantized graph behind the diffusers call the sampler makes (scalar or per-row timestep,
    ``return_dict=False``); ``config`` and ``dtype`` are the float UNet's. Batches over ``MAX_ROWS`` run
    in pieces: the export traced diffusers' upsampler on its under-64-rows branch, and guards it."""

    MAX_ROWS = 32

    def __init__(self, graph, config):
        super().__init__()
        self.graph, self.config, self.dtype = graph, config, torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        t = (timestep.reshape(-1).expand(sample.shape[0]) if timestep.numel() == 1 else timestep).to(torch.long)
        n, k = sample.shape[0], self.MAX_ROWS
        if n <= k:
            return (self.graph(sample, t.contiguous(), encoder_hidden_states),)
        return (torch.cat([self.graph(sample[i:i + k], t[i:i + k].contiguous(), encoder_hidden_states[i:i + k])
                           for i in range(0, n, k)]),)


def _record(gen, prompts: list[str], steps: int, guidance: float) -> dict[str, torch.Tensor]:
    """The UNet's inputs (latents, per-row timesteps, text embeddings) at ``CALIBRATION_STEPS`` of the
    steps of one batched generation of ``prompts``."""
    calls: list[tuple] = []
    unet = gen.backend.unet_model

    def recording(sample, timestep, emb, **kw):
        t = timestep.reshape(-1).expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        calls.append((sample.clone(), t.clone(), emb.clone()))
        return unet(sample, timestep, emb, **kw)

    gen.backend.unet_model = recording
    try:
        gen.generate([GenerationRequest(p, num_inference_steps=steps, guidance_scale=guidance, seed=10_000 + i)
                      for i, p in enumerate(prompts)])
    finally:
        gen.backend.unet_model = unet
    keep = sorted({round(i * (len(calls) - 1) / max(1, CALIBRATION_STEPS - 1)) for i in range(CALIBRATION_STEPS)})
    out = {}
    for j, i in enumerate(keep):
        out[f"sample.{j}"], out[f"timestep.{j}"], out[f"encoder_hidden_states.{j}"] = calls[i]
    return out


def _calls(tensors: dict, where: Path) -> list[tuple]:
    n = sum(1 for k in tensors if k.startswith("sample."))
    try:
        calls = [(tensors[f"sample.{j}"].float(), tensors[f"timestep.{j}"].long(),
                  tensors[f"encoder_hidden_states.{j}"].float()) for j in range(n)]
    except KeyError as e:
        raise UserError(f"{where} lacks {e.args[0]}; re-run `t2i export`") from None
    if not calls:
        raise UserError(f"{where} holds no calibration inputs; re-run `t2i export`")
    return calls


def quantize_unet(unet, calls: list[tuple]):
    """``unet`` (fp32, eval) exported with dynamic batch, height and width, annotated for x86 int8,
    calibrated on ``calls`` and converted: a module the sampler calls like the UNet."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    dyn = torch.export.Dim.DYNAMIC  # ranges inferred: diffusers' upsampler branches at 64 rows (see _Quantized)
    example = calls[0]
    with torch.no_grad():
        graph = torch.export.export(_Call(unet), example, dynamic_shapes={
            "sample": {0: dyn, 2: dyn, 3: dyn}, "timestep": {0: dyn}, "encoder_hidden_states": {0: dyn}}).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        graph = prepare_pt2e(graph, quantizer)
        for call in calls:
            graph(*call)
        graph = convert_pt2e(graph)
    return _Quantized(graph, unet.config)


class StaticInt8Base:
    """Writes and reads the folder; ``compiled.Compiled`` around it compiles the quantized UNet."""

    name = "int8-static"
    # wider than the dynamic int8 variants' 12: activation ranges fixed from a few prompts clip the rest, and
    # without VNNI oneDNN gives up a bit of the weights' range (its u8s8 products would saturate otherwise)
    TOLERANCE = 16.0
    INDUCTOR_OPTIONS = {"freezing": True}  # weights as constants: what lowers quantized patterns to oneDNN int8

    def unsupported(self, device: str) -> str | None:
        if device != "cpu":
            return "static int8 through X86InductorQuantizer targets x86 CPUs (on a GPU: eager-fp16, onnx-fp16)"
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"X86InductorQuantizer's int8 kernels are x86's; this machine is {platform.machine()}"
        try:
            from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e  # noqa: F401
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer  # noqa: F401
        except Exception as e:  # noqa: BLE001 - an old or broken torchao: the reason, not a crash
            return f"torchao's PT2E quantization does not import here ({type(e).__name__}: {str(e)[:120]})"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        from export.variants import REGISTRY

        notes = REGISTRY["eager-fp32"].build(model_dir, out_dir, device, ctx)
        prompts = ctx.get("calibration_prompts") or ["a photo"]
        gen = REGISTRY["eager-fp32"].load(out_dir, device)
        calib = _record(gen, prompts, ctx.get("steps", 20), ctx.get("guidance", 5.0))
        write_safetensors(out_dir / CALIBRATION, {k: v.half() if v.is_floating_point() else v
                                                  for k, v in calib.items()},
                          {"prompts": "\n".join(prompts), "seeds": f"10000..{10_000 + len(prompts) - 1}"})
        return {**notes, "quantized": "UNet convolutions and linear layers (int8 weights per channel, "
                                      "static int8 activations)",
                "calibration": f"{len(prompts)} prompts, UNet inputs at {len(calib) // 3} of "
                               f"{ctx.get('steps', 20)} steps"}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        from export.variants import REGISTRY

        where = var_dir / CALIBRATION
        if not where.exists():
            raise UserError(f"{var_dir} has no {CALIBRATION}; re-run `t2i export`")
        tensors, _ = read_safetensors(where, remedy="re-run `t2i export`")
        gen = REGISTRY["eager-fp32"].load(var_dir, device)
        gen.backend.unet_model = quantize_unet(gen.backend.unet_model, _calls(tensors, where))
        return gen
