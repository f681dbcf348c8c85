"""The variant registry: name -> a small module with the same four functions.

    unsupported(device) -> str | None   why it cannot run here (None: it can)
    build(model_dir, out_dir, device, ctx) -> dict   writes the variant folder; returns manifest notes
    load(var_dir, device) -> core.sampling.Generator   in a fresh process, from the folder alone
    ``BASE+APPROX`` names an approximate variant of a registered base (``export.variants.approx``).
    TOLERANCE: float   max mean-abs pixel difference (0-255) from eager-fp32 on the same seeds
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from export.variants import compiled, eager, int8_bnb, int8_static, int8_torchao, onnx

REGISTRY: dict[str, object] = {
    "eager-fp32": eager.Eager("fp32"),
    "eager-bf16": eager.Eager("bf16"),
    "eager-fp16": eager.Eager("fp16"),
    "int8-torchao": int8_torchao.TorchAOInt8("dynamic"),
    "int8-torchao-wo": int8_torchao.TorchAOInt8("weight-only"),
    "int8-bnb": int8_bnb.BnbInt8(),
    "compile": compiled.Compiled(base="eager-fp32"),
    "compile-int8": compiled.Compiled(base="int8-torchao"),
    "int8-static": int8_static.StaticInt8(),
    "onnx-fp32": onnx.Onnx("fp32"),
    "onnx-fp16": onnx.Onnx("fp16"),
    "onnx-int8": onnx.Onnx("int8"),
}
from export.config import DEFAULT_VARIANTS  # noqa: E402


def check_folder(variant, var_dir) -> None:
    """``variant``'s check of its folder before anything in it loads, where it has one (int8-static: its
    package was compiled for this CPU and torch); a UserError line otherwise."""
    check = getattr(variant, "check_folder", None)
    if check is not None:
        check(Path(var_dir))


def get(name: str):
    """The variant called ``name``: a registry entry, or ``BASE+APPROX`` (see ``export.variants.approx``)."""
    from core.errors import UserError
    from export.variants.approx import Approximate, parse

    spec = parse(name)
    if spec is not None:
        base, approx = spec
        if base not in REGISTRY:
            raise UserError(f"unknown base variant {base!r} in {name!r}; variants: {', '.join(REGISTRY)}")
        return Approximate(base, approx)
    if name not in REGISTRY:
        raise UserError(f"unknown variant {name!r}; variants: {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "DEFAULT_VARIANTS", "check_folder", "get", "ModuleType"]
