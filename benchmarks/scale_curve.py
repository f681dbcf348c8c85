"""How the exact export variants' speed-ups grow with the model: latency of one UNet step (batch 2, one
image under classifier-free guidance) of each variant at three model sizes, as ratios to eager-fp32
measured in the same run, written as JSON and a plot:

    .venv/bin/python benchmarks/scale_curve.py       # about 15 minutes on a 2-core CPU

Sizes (presets of ``training.presets``, random weights: size and timing only):
  tiny        6.7 M-parameter UNet, 16x16 latents (64x64 images): the shipped model's shape
  mid         72 M, 32x32 latents (128x128 images)
  sd15-shape  860 M, 64x64 latents (512x512 images): Stable Diffusion 1.5's UNet

Each variant is made with the functions ``t2i export`` uses (precision cast, torchao ``quantize_``,
``torch.compile``, the dynamo ONNX export and its int8 conversion, the same ONNX Runtime session
options, int8-static's PT2E quantization, here calibrated on random inputs), on the UNet alone.
``compile-bf16`` (bf16 through Inductor with freezing) is measured here only. ``onnx-int8-conv`` also quantizes the convolutions (ConvInteger), a recipe
tried here and not offered by ``t2i export``. ``eager-fp32+tome0.5`` is the one approximate variant here
(token merging, ``export.variants.tome``): its saving depends on the latent size, which is what this
measures (its quality is measured by ``t2i export`` on a trained model). The variants of one size are timed in rounds (each round
runs every variant once, in turn), so a slow moment of a shared machine falls on all of them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from core.io import write_json  # noqa: E402
from core.quiet import quiet_libraries  # noqa: E402

SIZES = ["tiny", "mid", "sd15-shape"]
VARIANTS = ["eager-fp32", "eager-bf16", "int8-torchao", "compile", "compile-bf16", "int8-static", "onnx-fp32",
            "onnx-int8", "onnx-int8-conv", "eager-fp32+tome0.5"]


def _unet(preset: str):
    from diffusers import UNet2DConditionModel

    from training.presets import PRESETS, unet_kwargs

    p = PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kwargs(p)).eval().requires_grad_(False)
    s = unet.config.sample_size
    inputs = (torch.randn(2, 4, s, s), torch.tensor([500.0, 500.0]), torch.randn(2, 77, p.text_width))
    return unet, inputs


def _torch_step(module, inputs, dtype=torch.float32):
    x, t, emb = inputs
    x, emb = x.to(dtype), emb.to(dtype)

    def step():
        with torch.inference_mode():
            return module(x, t, emb, return_dict=False)[0]
    return step


def _onnx(unet, inputs, folder: Path, precision: str):
    """The UNet as ``t2i export`` writes it for onnx-fp32 / onnx-int8 (batch-dynamic graph) and an ORT
    session with the export's options; returns the step and the graph's size in MB."""
    from export.variants import onnx as ox

    path = folder / "fp32" / "model.onnx"
    if not path.exists():
        batch = torch.export.Dim("batch", min=1, max=256)
        ox._export(ox._Unet(unet), inputs, ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                   {"sample": {0: batch}, "timestep": {0: batch}, "encoder_hidden_states": {0: batch}}, path)
    if precision != "fp32":
        target = folder / precision / "model.onnx"
        shutil.rmtree(target.parent, ignore_errors=True)
        shutil.copytree(path.parent, target.parent)
        if precision == "int8":
            ox._to_int8(target)
        else:  # int8-conv: the convolutions too (ONNX Runtime's ConvInteger)
            _to_int8_with_convs(target)
        path = target
    sess = ox._session(path, "cpu")
    feeds = ox.unet_feeds(inputs[0], inputs[1], inputs[2], "float32", ox.input_type(sess, "timestep"))
    mb = sum(f.stat().st_size for f in path.parent.iterdir()) / 2**20
    return (lambda: sess.run(None, feeds)), round(mb, 1)


def _to_int8_with_convs(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx
    from export.variants.onnx import _data_files, _drop_unreferenced

    external = bool(_data_files(path))
    m = onnx.load(str(path), load_external_data=False)
    del m.graph.value_info[:]
    onnx.save(m, str(path))
    q = path.with_name("model.int8.onnx")
    quantize_dynamic(str(path), str(q), op_types_to_quantize=["MatMul", "Gemm", "Conv"], weight_type=QuantType.QInt8,
                     use_external_data_format=external)
    q.replace(path)
    _drop_unreferenced(path.parent, path)


def _make(name: str, unet, inputs, work: Path):
    """(step function, notes) for variant ``name``; the time it took to make goes in the notes."""
    t0 = time.perf_counter()
    notes: dict = {}
    if name == "eager-fp32":
        step = _torch_step(unet, inputs)
    elif name == "eager-bf16":
        step = _torch_step(copy.deepcopy(unet).to(torch.bfloat16), inputs, torch.bfloat16)
    elif name == "int8-torchao":
        from torchao.quantization import quantize_

        from export.variants.int8_torchao import _config

        m = copy.deepcopy(unet)
        quantize_(m, _config("dynamic"))
        step = _torch_step(m, inputs)
    elif name == "compile":
        torch.compiler.reset()
        step = _torch_step(torch.compile(copy.deepcopy(unet), dynamic=False), inputs)
        step()  # the compile itself
    elif name == "compile-bf16":  # not a t2i export variant: what Inductor adds to bf16 (with freezing)
        torch.compiler.reset()
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            m = torch.compile(copy.deepcopy(unet).to(torch.bfloat16), dynamic=False)
            step = _torch_step(m, inputs, torch.bfloat16)
            step()  # the compile itself
    elif name == "int8-static":  # export.variants.int8_static, calibrated on random inputs (latency only)
        torch.compiler.reset()
        import torch._inductor.config as inductor_config

        from export.variants.int8_static import calibrate, inductor_options, quantize_unet

        g = torch.Generator().manual_seed(1)
        x, _, emb = inputs
        calls = [(torch.randn(x.shape, generator=g), torch.tensor([t, t], dtype=torch.float32),
                  torch.randn(emb.shape, generator=g)) for t in (900, 500, 100)]
        q = torch.compile(quantize_unet(unet, calibrate(unet, calls), calls[0]), dynamic=False)

        def step():
            with torch.no_grad(), inductor_config.patch(inductor_options()):
                return q(*inputs)[0]
        step()  # the compile itself
    elif name == "eager-fp32+tome0.5":
        from export.variants.tome import apply_token_merging

        m = copy.deepcopy(unet)
        notes["merged_attentions"] = apply_token_merging(m, 0.5)
        step = _torch_step(m, inputs)
    elif name.startswith("onnx-"):
        step, notes["graph_mb"] = _onnx(unet, inputs, work, name.removeprefix("onnx-"))
    else:
        raise SystemExit(f"unknown variant {name!r}; variants: {VARIANTS}")
    step()  # warm-up
    notes["make_s"] = round(time.perf_counter() - t0, 1)
    return step, notes


def bench_size(preset: str, variants: list[str], rounds: int, work: Path) -> dict:
    """Small models: every variant made first, then timed in rounds (each round runs each variant once).
    Models over 300 M parameters, whose variants do not all fit in memory together: one variant at a
    time, each round timing eager-fp32 and then the variant, and the variant freed before the next."""
    unet, inputs = _unet(preset)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    res: dict = {"unet_params_m": round(params, 1), "latent": list(inputs[0].shape[1:]), "variants": {},
                 "timing": "paired with eager-fp32, one variant in memory at a time" if params > 300 else "rounds"}
    with torch.inference_mode():
        ref = unet(*inputs, return_dict=False)[0]
    groups = [[v for v in variants]] if params <= 300 else [[v] for v in variants if v != "eager-fp32"]
    base_step = _torch_step(unet, inputs)
    for group in groups:
        steps = {}
        for name in group:
            print(f"[{preset}] making {name}", flush=True)
            try:
                steps[name], res["variants"][name] = _make(name, unet, inputs, work / preset)
            except Exception as e:  # noqa: BLE001 - a variant this machine cannot make is reported, not fatal
                first = str(e).splitlines()[0][:200] if str(e) else ""
                res["variants"][name] = {"error": f"{type(e).__name__}: {first}"}
        for name, step in steps.items():
            out = step()
            out = torch.as_tensor(out[0] if isinstance(out, list) else out).float()
            res["variants"][name]["max_abs_diff"] = round(float((out - ref.float()).abs().max()), 4)
        timed = dict(steps) if params <= 300 else {"eager-fp32": base_step, **steps}
        times: dict[str, list[float]] = {n: [] for n in timed}
        for r in range(rounds if steps else 0):
            for name, step in timed.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
            print(f"[{preset}] round {r + 1}/{rounds}: " +
                  ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in timed), flush=True)
        base = statistics.median(times["eager-fp32"]) if times.get("eager-fp32") else None
        for name in steps:
            ms = statistics.median(times[name]) * 1e3
            res["variants"][name].update(ms_per_step=round(ms, 1), ms_all=[round(t * 1e3, 1) for t in times[name]])
            if base:
                res["variants"][name]["speedup"] = round(base * 1e3 / ms, 2)
                res["variants"][name]["eager_fp32_ms_same_rounds"] = round(base * 1e3, 1)
        del steps, timed
        torch.compiler.reset()  # a compiled variant's frozen weights live in dynamo's caches until then
        gc.collect()
    if params > 300:
        res["variants"] = {"eager-fp32": {"ms_per_step": statistics.median(
            [v["eager_fp32_ms_same_rounds"] for v in res["variants"].values() if "eager_fp32_ms_same_rounds" in v]),
            "speedup": 1.0, "max_abs_diff": 0.0}, **res["variants"]}
    del unet
    gc.collect()
    return res


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in result["sizes"] if result["sizes"][s].get("variants")]
    params = [result["sizes"][s]["unet_params_m"] for s in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = sorted({n for s in sizes for n in result["sizes"][s]["variants"]}, key=VARIANTS.index)
    for name in names:
        pts = [(p, result["sizes"][s]["variants"].get(name, {}).get("speedup")) for s, p in zip(sizes, params)]
        pts = [(p, v) for p, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(params, [f"{s}\n{p:g} M" for s, p in zip(sizes, params)])
    ax.set_ylabel("speed-up per UNet step vs eager-fp32")
    ax.set_title(f"UNet step speed-up by model size ({result['threads']} CPU threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated presets (default: {','.join(SIZES)})")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated (default: {','.join(VARIANTS)})")
    bf16_units = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ap.add_argument("--skip", default="sd15-shape:compile" + ("" if bf16_units else ",sd15-shape:eager-bf16,sd15-shape:compile-bf16"),
                    help="SIZE:VARIANT pairs left out (default: the fp32 compile of the SD1.5-shaped UNet, "
                         "minutes of Inductor for a recipe no faster than eager at the mid size, and on a CPU "
                         "without bf16 units its bf16 steps, minutes each)")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per size (default: 30 tiny, 10 mid, 3 sd15)")
    ap.add_argument("--out", default="benchmarks/results/scale_curve.json", help="JSON result (the plot goes beside)")
    ap.add_argument("--work", default=None, help="folder for the ONNX graphs (default: a temporary one)")
    args = ap.parse_args()
    quiet_libraries()
    sizes = [s for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; variants: {VARIANTS}")
    skip = {tuple(p.split(":", 1)) for p in args.skip.split(",") if ":" in p}
    work = Path(args.work or tempfile.mkdtemp(prefix="t2i-scale-"))
    out = Path(args.out)
    result: dict = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "bf16_units": bf16_units, "vnni": _cpu_flag("avx512_vnni") or _cpu_flag("avx_vnni"),
                    "unit": "ms per UNet step, batch 2 (one guided image)", "sizes": {}}
    if out.is_file():  # the sizes measured before and not measured now are kept (one size at a time is fine)
        from core.io import read_json_file

        result["sizes"] = {k: v for k, v in read_json_file(out, "earlier results", "delete it").get("sizes", {}).items()
                           if k not in sizes}
    try:
        for size in sizes:
            print(f"[{size}] measuring", flush=True)
            rounds = args.rounds or {"tiny": 30, "mid": 10}.get(size, 3)
            t0 = time.perf_counter()
            result["sizes"][size] = bench_size(size, [v for v in variants if (size, v) not in skip], rounds, work)
            result["sizes"][size]["wall_s"] = round(time.perf_counter() - t0, 1)
            write_json(out, result)  # what is measured so far survives a later failure
        plot(result, out.with_suffix(".png"))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({s: {n: v.get("speedup", v.get("error")) for n, v in r["variants"].items()}
                      for s, r in result["sizes"].items()}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
