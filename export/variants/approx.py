"""Approximate variants: an exact variant that computes less per step, gated by measured quality.

Named ``BASE+APPROX[+APPROX]``, e.g. ``onnx-int8+trunc0.4``, ``eager-fp32+cache3+trunc0.5``; same steps, scheduler
and seeds as the baseline, only how much of the network runs per step changes:

- ``trunc<F>``: guidance truncation. The last fraction F of the steps runs without the unconditional
  pass (half the UNet rows), as adaptive-guidance studies found the late steps barely use it. Any
  base. ``trunc0`` is the base exactly.
- ``cache<N>``: feature caching (DeepCache). Every N-th step runs the whole UNet and keeps, per image,
  the input of its last up block; the steps in between run only the shallow path (conv_in, the first
  down block, the last up block, conv_out) on that kept input. Torch bases (eager, int8-torchao) split
  the UNet at run time; ONNX bases get two more graphs (``unet_cache/full.onnx``: the output and the
  kept input; ``unet_cache/shallow.onnx``), exported from the same split and checked against it. Not
  the compiled UNet (one graph). ``cache1`` is the base exactly. ``cache<N>from<F>`` caches only from
  the fraction F of the steps on: the early steps, which lay out the shapes and colours, run whole
  (parsed as two entries, ``cache`` N and ``cachefrom`` F; ``from0`` is plain ``cache<N>``; F x steps
  is rounded to a whole step, so at 20 steps ``from0.99`` caches nothing).
- ``tome<R>``: token merging (ToMe-SD, ``export.variants.tome``). Each self-attention at the UNet's
  highest resolution runs on the tokens left after merging the fraction R (0 < R < 1) into similar
  ones. Torch bases (eager, int8-torchao); on a CPU it saves little (1.07x at SD 1.5's 64x64 latents).

The variant folder is the base's folder plus ``approx.json`` ({"base", "approximations"}), so the loader,
serving and the Bento apply the same approximation that was benchmarked.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from core.errors import UserError

APPROX_FILE = "approx.json"
KINDS = {"trunc": "guidance truncation (fraction of the last steps without the unconditional pass)",
         "cache": "feature caching (full UNet every N-th step, shallow path in between)",
         "cachefrom": "feature caching from this fraction of the steps on (the earlier steps run whole)",
         "tome": "token merging (fraction of the top-resolution tokens merged before self-attention)"}
CACHE_BASES = ("eager-fp32", "eager-bf16", "eager-fp16", "int8-torchao", "int8-torchao-wo", "onnx-fp32", "onnx-fp16",
               "onnx-int8")
TORCH_BASES = ("eager-fp32", "eager-bf16", "eager-fp16", "int8-torchao", "int8-torchao-wo")
CACHE_DIR = "unet_cache"  # an ONNX base's split UNet


def parse(name: str) -> tuple[str, list[tuple[str, float]]] | None:
    """(base, [(kind, param), ...]) of ``BASE+APPROX[+APPROX]``; None for a plain name; UserError for a
    malformed one."""
    if "+" not in name:
        return None
    base, *approx = name.split("+")
    out = []
    for a in approx:
        m = re.fullmatch(r"(trunc)(0(?:\.\d+)?|1(?:\.0+)?)|(cache)([1-9]\d?)(?:from(0(?:\.\d+)?))?"
                         r"|(tome)(0\.\d*[1-9]\d*)", a)
        if not m:
            raise UserError(f"unknown approximation {a!r} in {name!r}; use BASE+trunc<F> (0 <= F <= 1, e.g. "
                            "onnx-int8+trunc0.4), BASE+cache<N>[from<F>] (N = 1..99, 0 <= F < 1, e.g. "
                            "eager-fp32+cache3 or onnx-int8+cache2from0.4), BASE+tome<R> (0 < R < 1, e.g. "
                            "eager-fp32+tome0.5), or several")
        kind = next(m.group(i) for i in (1, 3, 6) if m.group(i))
        out.append((kind, float(m.group({"trunc": 2, "cache": 4, "tome": 7}[kind]))))
        if kind == "cache" and m.group(5) is not None:
            out.append(("cachefrom", float(m.group(5))))
    if len({k for k, _ in out}) < len(out):
        raise UserError(f"{name!r} names one approximation twice")
    return base, out


class CachedUNet:
    """DeepCache on a diffusers ``UNet2DConditionModel``, without copying its forward: a full call
    records the input of the last up block (one row per UNet row); a shallow call swaps the deep
    blocks for stand-ins that pass their input through and feeds the last up block the given input."""

    def __init__(self, unet):
        self.unet = unet
        self.last_up = unet.up_blocks[-1]
        self.deep = [*unet.down_blocks[1:], *([unet.mid_block] if unet.mid_block is not None else []),
                     *unet.up_blocks[:-1]]

    def __call__(self, sample, t, emb, deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kept = {}
        if deep is None:
            def record(module, args, kwargs):
                kept["deep"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hook = self.last_up.register_forward_pre_hook(record, with_kwargs=True)
            try:
                out = self.unet(sample, t, emb, return_dict=False)[0]
            finally:
                hook.remove()
            return out, kept["deep"]

        def feed(module, args, kwargs):
            return args, {**kwargs, "hidden_states": deep}
        downs = set(self.unet.down_blocks[1:])
        hook = self.last_up.register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for block in self.deep:
                n_out = len(getattr(block, "resnets", [])) + len(getattr(block, "downsamplers", None) or [])
                block.forward = _pass_through(n_out if block in downs else None)
            out = self.unet(sample, t, emb, return_dict=False)[0]
        finally:
            hook.remove()
            for block in self.deep:
                del block.forward  # back to the class's forward
        return out, deep


def _pass_through(n_res: int | None):
    """A deep block's stand-in: a down block returns its input and ``n_res`` residuals, others the input."""
    def forward(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, (h,) * n_res) if n_res is not None else h
    return forward


def cached_unet_call(backend):
    """``backend.unet_cached(latents, t, emb, deep) -> (noise, deep)`` for a TorchBackend."""
    cached = CachedUNet(backend.unet_model)

    def unet_cached(latents, t, text_emb, deep=None):
        d = backend.device
        noise, kept = cached(latents.to(d, backend.dtype), t.to(d), text_emb.to(d, backend.dtype),
                             None if deep is None else deep.to(d))
        return noise.cpu(), kept
    return unet_cached


class _Full(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.split = unet, CachedUNet(unet)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.split(sample, timestep, encoder_hidden_states, None)


class _Shallow(_Full):
    def forward(self, sample, timestep, encoder_hidden_states, deep):
        return self.split(sample, timestep, encoder_hidden_states, deep)[0]


def export_onnx_split(model_dir: Path, out_dir: Path, precision: str) -> dict:
    """Writes OUT/unet_cache/{full,shallow}.onnx from the model's UNet, checked against the torch split
    (batch, height and width dynamic as the base's UNet graph), then converted like the base."""
    from export.common import load_torch_parts, model_meta
    from export.variants import onnx as ox

    te, unet, vae = load_torch_parts(model_dir)
    _, examples, names, _, shapes = ox._parts(te, unet, vae, model_meta(model_dir)["max_size"])["unet"]
    full, shallow = _Full(unet).eval(), _Shallow(unet).eval()
    with torch.no_grad():
        deeps = [full(*args)[1] for args in examples]
    lat = shapes["sample"]
    errors = {}
    for mod, name, args_list, ins, outs, dyn in (
            (full, "full", examples, names, ["out_sample", "deep"], shapes),
            (shallow, "shallow", [(*a, d) for a, d in zip(examples, deeps)], names + ["deep"], ["out_sample"],
             {**shapes, "deep": {0: lat[0], 2: lat[2], 3: lat[3]}})):
        path = out_dir / CACHE_DIR / f"{name}.onnx"
        ox._export(mod, args_list[0], ins, outs, dyn, path)
        errors[name] = ox._check(mod, args_list, path, f"UNet ({name} split)", ox.COMPONENT_ATOL["unet"])
        if precision == "int8":
            ox._to_int8(path)
        elif precision == "fp16":
            ox._to_fp16(path)
    return errors


def onnx_cached_unet_call(var_dir: Path, device: str, precision: str):
    """``unet_cached`` over an ONNX base's split graphs."""
    import numpy as np

    from export.variants.onnx import _session, input_type, unet_feeds

    full = _session(Path(var_dir) / CACHE_DIR / "full.onnx", device)
    shallow = _session(Path(var_dir) / CACHE_DIR / "shallow.onnx", device)
    dt = np.float16 if precision == "fp16" else np.float32
    t_dtype = input_type(full, "timestep")

    def unet_cached(latents, t, text_emb, deep=None):
        feeds = unet_feeds(latents, t, text_emb, dt, t_dtype)
        if deep is None:
            out, kept = full.run(None, feeds)
            return torch.from_numpy(out.astype(np.float32)), torch.from_numpy(kept)
        out = shallow.run(None, {**feeds, "deep": deep.numpy().astype(dt)})[0]
        return torch.from_numpy(out.astype(np.float32)), deep
    return unet_cached


def apply(gen, kind: str, param: float, var_dir: Path | None = None, base: str = "", device: str = "cpu"):
    """Sets the approximation on a loaded Generator (an ONNX base's caching needs its folder)."""
    if kind == "trunc":
        gen.guidance_truncation = float(param)
    elif kind == "cache":
        if hasattr(gen.backend, "unet_model"):
            gen.backend.unet_cached = cached_unet_call(gen.backend)
        elif base.startswith("onnx-") and var_dir is not None:
            gen.backend.unet_cached = onnx_cached_unet_call(var_dir, device, base.removeprefix("onnx-"))
        else:
            raise UserError("feature caching needs a torch UNet or an ONNX base's split graphs")
        gen.cache_interval = int(param)
    elif kind == "cachefrom":
        gen.cache_start = float(param)
    elif kind == "tome":
        if not hasattr(gen.backend, "unet_model"):
            raise UserError("token merging needs a torch UNet (an eager or int8-torchao base)")
        from export.variants.tome import apply_token_merging

        apply_token_merging(gen.backend.unet_model, float(param))
    return gen


class Approximate:
    def __init__(self, base: str, approx: list[tuple[str, float]]):
        self.base, self.approx = base, list(approx)
        self.TOLERANCE = 255.0  # not an exact variant: the quality gate alone decides

    def _base(self):
        from export.variants import get

        return get(self.base)

    def check_folder(self, var_dir: Path) -> None:
        """The base's check of its folder before anything loads (int8-static: its package's target)."""
        from export.variants import check_folder

        check_folder(self._base(), var_dir)

    def unsupported(self, device: str) -> str | None:
        reason = self._base().unsupported(device)
        if reason:
            return f"its base {self.base} is unsupported: {reason}"
        if "cache" in dict(self.approx) and self.base not in CACHE_BASES:
            return (f"feature caching needs a UNet it can split; {self.base} runs it as one compiled graph "
                    f"(bases: {', '.join(CACHE_BASES)})")
        if "tome" in dict(self.approx) and self.base not in TORCH_BASES:
            return (f"token merging patches the attention of a torch UNet; {self.base} runs a graph "
                    f"(bases: {', '.join(TORCH_BASES)})")
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        built = ctx.get("built", {}).get(self.base)
        if built is not None and Path(built).is_dir():  # the base is in this export already: reuse it
            shutil.copytree(built, out_dir, dirs_exist_ok=True)
            notes = dict(ctx.get("notes", {}).get(self.base, {}))
        else:
            notes = self._base().build(model_dir, out_dir, device, ctx)
        if "cache" in dict(self.approx) and self.base.startswith("onnx-"):
            sibling = next((Path(d) / CACHE_DIR for n, d in ctx.get("built", {}).items()
                            if n.startswith(self.base + "+") and (Path(d) / CACHE_DIR).is_dir()), None)
            if sibling is not None:  # another approximation of this base exported the same split
                shutil.copytree(sibling, out_dir / CACHE_DIR)
            else:
                notes = {**notes, "split_max_abs_error_vs_torch": export_onnx_split(
                    model_dir, out_dir, self.base.removeprefix("onnx-"))}
        (out_dir / APPROX_FILE).write_text(json.dumps({"base": self.base, "approximations": self.spec()}))
        return {**notes, "base": self.base, "approximation": "; ".join(f"{KINDS[k]}: {p:g}" for k, p in self.approx)}

    def spec(self) -> list[dict]:
        return [{"kind": k, "param": p} for k, p in self.approx]

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        from core.io import read_json_file

        spec = read_json_file(Path(var_dir) / APPROX_FILE, "approximation settings", "re-run `t2i export`")
        if spec.get("base") != self.base or spec.get("approximations") != self.spec():
            raise UserError(f"{var_dir / APPROX_FILE} says {spec}, not what {self.base}+... names; re-run `t2i export`")
        gen = self._base().load(var_dir, device, trusted=trusted)
        for kind, param in self.approx:
            apply(gen, kind, param, Path(var_dir), self.base, device)
        return gen
