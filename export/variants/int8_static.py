"""int8-static: static int8 of the UNet through PyTorch 2 export quantization (PT2E) and Inductor.

Every convolution and linear layer of the UNet (the attention's projections included; the attention
product itself, the norms, the text encoder and the VAE stay fp32) gets int8 weights per output channel
and int8 activations whose ranges were calibrated on the UNet's own inputs while the model sampled
(torchao's ``X86InductorQuantizer``: histogram observers for activations, per-channel min/max for
weights). Inductor, with freezing, lowers them to oneDNN's int8 kernels, which use VNNI or AMX where the
CPU has them. Activations keep all 8 bits on every x86 CPU: torchao advises 7 (``reduce_range``) without
VNNI, but on an AVX2 CPU without it the micro model's round trip was 17.1 levels with 7 bits and 10.8 with 8
(10.2-10.5 with VNNI), and the round trip each export measures would catch a model that overflowed.
Unlike int8-torchao (activations quantized per call) and onnx-int8 (MatMuls only; ONNX Runtime's
ConvInteger is slower than its fp32 convolution) this quantizes the convolutions, most of a real-size
UNet's arithmetic on a CPU.

The folder is eager-fp32's (safetensors), ``calibration.safetensors`` (the observers' statistics after the
model drew images for prompts other than the gate's) and ``unet_int8.pt2``: the quantized UNet compiled
ahead of time by AOTInductor at build, for any batch up to MAX_ROWS rows and any image size. A fresh process
(the benchmark, a server) loads that package in a second instead of quantizing and compiling again (about
a minute on the micro model; Inductor's cache cannot hold graphs with frozen int8 weights). The package is
compiled code: it loads only through ``export.trust`` (built on this machine, or --trusted-artifacts).
``StaticInt8Base`` reads the statistics into a freshly prepared graph (no forward pass) and converts it,
uncompiled: what the package is compiled from."""
from __future__ import annotations

import io
import platform
import shutil
import time
from pathlib import Path

import torch

from core.errors import UserError
from core.io import read_safetensors, write_safetensors
from core.sampling import GenerationRequest
from export.variants.compiled import per_row_timestep

CALIBRATION = "calibration.safetensors"
PACKAGE = "unet_int8.pt2"
TARGET = "target.json"  # the torch and CPU instruction sets the package was compiled for
ISA_FLAGS = ("avx", "sse", "ssse3", "fma", "f16c", "bmi", "amx", "popcnt", "movbe", "abm", "adx", "sha_ni", "aes",
             "pclmulqdq", "vpclmulqdq", "gfni", "vaes")  # /proc/cpuinfo flags that are instruction sets
NOT_EMITTED = {"sse4a", "fma4"}  # AMD-only sets GCC does not vectorize with: an AMD build runs on Intel
CODE_KIND = "an AOTInductor package (the int8 UNet's compiled kernels)"
CALIBRATION_STEPS = 6  # UNet calls observed per calibration generation, evenly over the steps
CALIBRATION_SEED = 10_000  # calibration image i uses this + i; the gate's seeds start at the export's seed
OBSERVER = "activation_post_process_"  # how prepare_pt2e names its observers


def _chunked(fn, sample, t, emb, rows: int):
    """``fn`` over at most ``rows`` rows at a time, concatenated."""
    if sample.shape[0] <= rows:
        return fn(sample, t, emb)
    return torch.cat([fn(sample[i:i + rows], t[i:i + rows], emb[i:i + rows]) for i in range(0, sample.shape[0], rows)])


class _Quantized(torch.nn.Module):
    """The quantized graph behind the diffusers call the sampler makes (scalar or per-row timestep,
    ``return_dict=False``); ``config`` and ``dtype`` are the float UNet's. Batches over ``MAX_ROWS`` run
    in pieces: the export traced diffusers' upsampler on its under-64-rows branch, and guards it."""

    MAX_ROWS = 32

    def __init__(self, graph, config):
        super().__init__()
        self.graph, self.config, self.dtype = graph, config, torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        t = per_row_timestep(timestep, sample.shape[0])
        # contiguous: an AOTInductor package assumes the strides it was compiled for and does not check them
        return (_chunked(self.graph, sample.contiguous(), t, encoder_hidden_states.contiguous(), self.MAX_ROWS),)


def _record(gen, prompts: list[str], steps: int, guidance: float) -> list[tuple]:
    """The UNet's inputs (latents, per-row timesteps, text embeddings) at ``CALIBRATION_STEPS`` of the
    steps of one batched generation of ``prompts``."""
    calls: list[tuple] = []
    unet = gen.backend.unet_model

    def recording(sample, timestep, emb, **kw):
        calls.append((sample.clone(), per_row_timestep(timestep, sample.shape[0]), emb.clone()))
        return unet(sample, timestep, emb, **kw)

    gen.backend.unet_model = recording
    try:
        gen.generate([GenerationRequest(p, num_inference_steps=steps, guidance_scale=guidance,
                                        seed=CALIBRATION_SEED + i) for i, p in enumerate(prompts)])
    finally:
        gen.backend.unet_model = unet
    keep = sorted({round(i * (len(calls) - 1) / max(1, CALIBRATION_STEPS - 1)) for i in range(CALIBRATION_STEPS)})
    return [calls[i] for i in keep]


def _x86_quantizer():
    """torchao's x86 quantizer module. Its first import installs torchao's pass (``quant_lift_up``) as
    Inductor's global pre-grad pass, which enters the cache key of every graph the process compiles after
    it: a compile variant built beside int8-static then shipped a cache no fresh process could hit. The
    global is put back; int8-static's own compile gets the pass through ``inductor_options``."""
    import torch._inductor.config as inductor_config

    before = inductor_config.pre_grad_custom_pass
    try:
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    finally:
        inductor_config.pre_grad_custom_pass = before
        from torchao.quantization.pt2e.inductor_passes import x86

        if before is getattr(x86, "quant_lift_up", None):  # imported (and installed) before this was called
            inductor_config.pre_grad_custom_pass = None
    return x86_inductor_quantizer


def inductor_options() -> dict:
    """Inductor settings that lower the quantized graph to oneDNN's int8 kernels: freezing (the weights
    become constants) and torchao's pre-grad pass."""
    _x86_quantizer()
    from torchao.quantization.pt2e.inductor_passes.x86 import quant_lift_up

    return {"freezing": True, "pre_grad_custom_pass": quant_lift_up}


def _prepared(unet, example: tuple):
    """``unet`` exported with dynamic batch, height and width and annotated with x86 int8 observers."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    xiq = _x86_quantizer()

    from export.variants.onnx import _Unet  # the UNet as a function of three tensors, as the ONNX export traces it

    dyn = torch.export.Dim.DYNAMIC  # ranges inferred: diffusers' upsampler branches at 64 rows (see _Quantized)
    example = tuple(x[:_Quantized.MAX_ROWS] for x in example)
    with torch.no_grad():
        graph = torch.export.export(_Unet(unet), example, dynamic_shapes={
            "sample": {0: dyn, 2: dyn, 3: dyn}, "timestep": {0: dyn}, "encoder_hidden_states": {0: dyn}}).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return prepare_pt2e(graph, quantizer)


def _statistics(graph) -> dict[str, torch.Tensor]:
    """Every observer's buffers by name (copies: observers shared between inputs appear under each name)."""
    return {k: v.clone() for k, v in graph.state_dict().items() if k.startswith(OBSERVER)}


def calibrate(unet, calls: list[tuple]) -> dict[str, torch.Tensor]:
    """The observers' statistics after ``calls`` (each at most MAX_ROWS rows at a time)."""
    graph = _prepared(unet, calls[0])
    with torch.no_grad():
        for sample, t, emb in calls:
            _chunked(graph, sample, t, emb, _Quantized.MAX_ROWS)
    return _statistics(graph)


def quantize_unet(unet, statistics: dict[str, torch.Tensor], example: tuple, where: str = "calibration"):
    """``unet`` (fp32, eval) quantized with the observers' ``statistics``: a module the sampler calls like
    the UNet. ``example``: inputs of the shapes it will see (the export traces them)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    graph = _prepared(unet, example)
    expected = _statistics(graph)
    remedy = "re-run `t2i export`"
    if set(statistics) != set(expected):
        missing, extra = sorted(set(expected) - set(statistics)), sorted(set(statistics) - set(expected))
        raise UserError(f"{where} does not match this UNet's observers ({len(missing)} missing, {len(extra)} "
                        f"unknown, e.g. {(missing or extra)[0]}); {remedy}")
    for k, v in statistics.items():
        e = expected[k]
        if v.dtype != e.dtype or v.dim() != e.dim() or (e.numel() > 1 and v.shape != e.shape) or \
                not torch.isfinite(v).all():
            raise UserError(f"{where}: {k} is not a finite statistic of its observer's shape; {remedy}")
    try:
        graph.load_state_dict(statistics, strict=False)
        with torch.no_grad():
            graph = convert_pt2e(graph)
    except (RuntimeError, ValueError, IndexError) as e:  # e.g. a per-channel statistic of the wrong length
        raise UserError(f"{where} does not fit this UNet ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"{remedy}") from None
    return _Quantized(graph, unet.config)


def package(quantized: _Quantized, example: tuple, path: Path) -> dict:
    """Compiles ``quantized``'s graph ahead of time into ``path`` (AOTInductor, with freezing: the weights
    become constants and the quantized patterns lower to oneDNN's int8 kernels), for 1 to MAX_ROWS rows and
    any latent size. Returns how many convolutions and linear layers were lowered to int8 kernels."""
    import torch._inductor
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    rows = torch.export.Dim("rows", min=1, max=_Quantized.MAX_ROWS)
    dyn = torch.export.Dim.DYNAMIC
    # AOTInductor writes its target into the global config (aot_inductor.metadata), which would change the
    # cache keys of whatever this process compiles next (the compile variant's shipped cache would then miss)
    with torch.no_grad(), inductor_config.patch({"aot_inductor.metadata": {}}):
        program = torch.export.export(quantized.graph, example, dynamic_shapes=(
            {0: rows, 2: dyn, 3: dyn}, {0: rows}, {0: rows}))
        counters.clear()
        # no FX graph cache: the pattern passes run (and are counted) on every build
        # threads as the loading process has them (not the build's count, fixed into the kernels)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
            **inductor_options(), "fx_graph_cache": False, "cpp.dynamic_threads": True})
    passes = counters["inductor"]
    return {"convolutions": passes["qconv_weight_prepack_matcher_count"],
            "linear_layers": passes["qlinear_weight_prepack_matcher_count"]}


def cpu_flags() -> set[str] | None:
    """This CPU's instruction-set flags (/proc/cpuinfo; None where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return None
    flags = {fl for fl in line.partition(":")[2].split() if fl.startswith(ISA_FLAGS)} - NOT_EMITTED
    return flags if line else None


def _example(gen) -> tuple:
    """UNet inputs of the native size: two rows, as a guided step has."""
    config = gen.backend.unet_model.config
    side = config.sample_size
    return (torch.zeros(2, config.in_channels, side, side), torch.tensor([500.0, 500.0]), gen.encode(["", ""]))


class StaticInt8Base:
    """Writes the eager weights and the calibration; ``load`` gives the quantized graph, uncompiled."""

    name = "int8-static"
    # wider than the dynamic int8 variants' 12 (the micro model's round trip: 10.2-10.8 levels, with VNNI or
    # without): activation ranges fixed from a few prompts clip the rest
    TOLERANCE = 16.0

    def unsupported(self, device: str) -> str | None:
        if device != "cpu":
            return "static int8 through X86InductorQuantizer targets x86 CPUs (on a GPU: eager-fp16, onnx-fp16)"
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"X86InductorQuantizer's int8 kernels are x86's; this machine is {platform.machine()}"
        try:
            from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e  # noqa: F401

            inductor_options()
        except Exception as e:  # noqa: BLE001 - an old or broken torchao: the reason, not a crash
            return f"torchao's PT2E quantization does not import here ({type(e).__name__}: {str(e)[:120]})"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        from export.variants import REGISTRY

        notes = REGISTRY["eager-fp32"].build(model_dir, out_dir, device, ctx)
        prompts, steps = ctx["calibration_prompts"], ctx["steps"]
        gen = REGISTRY["eager-fp32"].load(out_dir, device)
        calls = _record(gen, prompts, steps, ctx["guidance"])
        write_safetensors(out_dir / CALIBRATION, calibrate(gen.backend.unet_model, calls),
                          {"prompts": "\n".join(prompts),
                           "seeds": f"{CALIBRATION_SEED}..{CALIBRATION_SEED + len(prompts) - 1}"})
        return {**notes, "quantized": "UNet convolutions and linear layers (int8 weights per channel, "
                                      "static int8 activations)",
                "calibration": f"{len(prompts)} prompts ({ctx.get('calibration_overlap', 0)} of them among the "
                               f"gate's), UNet inputs at {len(calls)} of {steps} steps"}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        from export.variants import REGISTRY

        where = var_dir / CALIBRATION
        if not where.exists():
            raise UserError(f"{var_dir} has no {CALIBRATION}; re-run `t2i export`")
        statistics, _ = read_safetensors(where, remedy="re-run `t2i export`")
        gen = REGISTRY["eager-fp32"].load(var_dir, device)
        gen.backend.unet_model = quantize_unet(gen.backend.unet_model, statistics, _example(gen), str(where))
        return gen


class StaticInt8(StaticInt8Base):
    """The registry's int8-static: the quantized UNet compiled ahead of time at build, loaded as a package.
    Inductor compiles it for the build machine (``-march=native``), so ``target.json`` records the build's
    torch and CPU instruction sets; another torch, or a CPU missing one of those sets, is refused with the
    remedy instead of crashing on an illegal instruction."""

    def unsupported(self, device: str) -> str | None:
        reason = super().unsupported(device)
        if reason:
            return reason
        import torch._inductor

        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no AOTInductor packaging (torch >= 2.6 does)"
        if not shutil.which("g++") and not shutil.which("c++"):
            return "AOTInductor on CPU needs a C++ compiler (g++), and none is installed"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        from core.io import write_json
        from export import trust

        notes = super().build(model_dir, out_dir, device, ctx)
        gen = StaticInt8Base.load(self, out_dir, device)
        t0 = time.perf_counter()
        kernels = package(gen.backend.unet_model, _example(gen), out_dir / PACKAGE)
        if not (kernels["convolutions"] and kernels["linear_layers"]):
            raise RuntimeError(f"Inductor lowered {kernels} layers to int8 kernels: the quantized patterns did "
                               "not match (a torch or torchao change?)")
        trust.record(out_dir, [PACKAGE], CODE_KIND)
        write_json(out_dir / TARGET, {"torch": torch.__version__, "cpu_flags": sorted(cpu_flags() or [])})
        return {**notes, "int8_kernels": kernels, "compile_s": round(time.perf_counter() - t0, 1)}

    @staticmethod
    def check_folder(var_dir: Path) -> None:
        """A UserError line when the package is missing or was built for another torch or a CPU with
        instruction sets this one lacks (reads two small files; nothing runs)."""
        from core.io import read_json_file

        remedy = "re-run `t2i export` on this machine"
        missing = [f for f in (PACKAGE, TARGET) if not (var_dir / f).exists()]
        if missing:
            raise UserError(f"{var_dir} has no {' or '.join(missing)} (an int8-static folder of an older t2i); "
                            f"{remedy}")
        target = read_json_file(var_dir / TARGET, "int8-static build target", remedy)
        if target.get("torch") != torch.__version__:
            raise UserError(f"{var_dir / PACKAGE} was compiled by torch {target.get('torch')} and this is torch "
                            f"{torch.__version__}; {remedy}")
        here = cpu_flags()
        missing = sorted(set(target.get("cpu_flags") or []) - here) if here is not None else []
        if missing:
            raise UserError(f"{var_dir / PACKAGE} was compiled for a CPU with {', '.join(missing[:6])}, which this "
                            f"CPU lacks; {remedy}")

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        import torch._inductor

        from core.models import load_torch_parts
        from export import trust
        from export.common import torch_generator

        self.check_folder(var_dir)
        data = trust.verified_bytes(var_dir, PACKAGE, trusted)  # verified and trusted, or refused, before it runs
        te, config, vae = load_torch_parts(var_dir, torch.float32, device, unet=False)  # not the fp32 UNet
        try:
            runner = torch._inductor.aoti_load_package(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - a package torch cannot read: one line
            raise UserError(f"{var_dir / PACKAGE} does not load here ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); re-run `t2i export`") from None
        return torch_generator(var_dir, te, _Quantized(runner, config), vae, torch.float32, device,
                               {"variant": "int8-static"})
