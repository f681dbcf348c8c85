"""A device check that runs on a CPU: catches a tensor left on the CPU that meets a model on a GPU.

On a CUDA machine ``conv(cpu_tensor)`` with CUDA weights raises; on a CPU-only machine every tensor is
on the CPU and that class of bug cannot show. Here the models are moved to PyTorch's ``meta`` device
(shapes without data) and every torch call is checked under ``strict_devices()``: a call whose tensors
are on two devices raises ``DeviceMismatch``, as CUDA would (0-dim CPU tensors excepted, as CUDA
accepts them; moves and indexing with CPU indices excepted, as CUDA does them). Meta tensors have no
values, so the code under test runs until it first reads one (``.item()``, ``.cpu()``, ``float()``,
``.numpy()``): that raises ``NeedsData``, which means every device-dependent step before it was
consistent. Meta itself accepts CPU inputs to meta weights silently, hence the check.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")


class DeviceMismatch(AssertionError):
    """A torch call got tensors on two devices (a RuntimeError on CUDA)."""


class NeedsData(Exception):
    """The code read a value of a meta tensor: the shape path ends here."""


_T = torch.Tensor
_READS = {_T.item, _T.tolist, _T.numpy, _T.__float__, _T.__int__, _T.__bool__, _T.__index__, _T.__array__}
_MOVES = {_T.to, _T.cpu, _T.copy_, _T.type_as, _T.new_tensor, _T.expand_as, _T.view_as, _T.reshape_as}
_INDEXING = {_T.__getitem__, _T.__setitem__, _T.index_put_}


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


class _Strict(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors)
        if on_meta and (func in _READS or (func in (_T.cpu,) or _moves_to_cpu(func, args, kwargs))):
            raise NeedsData(_name(func))
        if func in _INDEXING:  # CUDA takes CPU indices into a CUDA tensor, not CUDA indices into a CPU one
            base = args[0]
            if base.device.type == "cpu" and any(t.device.type != "cpu" for t in tensors[1:] if t.dim() > 0):
                raise DeviceMismatch(f"{_name(func)}: a CPU tensor indexed with tensors on another device")
        elif func not in _MOVES:
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise DeviceMismatch(f"{_name(func)} got tensors on {sorted(str(d) for d in devices)}")
        gen = kwargs.get("generator")
        if gen is not None:  # a generator draws on its own device only
            dev = kwargs.get("device")
            where = {torch.device(dev).type} if dev is not None else {t.device.type for t in tensors}
            if where and where != {gen.device.type}:
                raise DeviceMismatch(f"{_name(func)} draws on {sorted(where)} with a {gen.device.type} generator")
        return func(*args, **kwargs)


def _moves_to_cpu(func, args, kwargs) -> bool:
    if func is not _T.to:
        return False
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return target is not None and torch.device(target).type == "cpu"


@contextmanager
def strict_devices():
    """Every torch call inside must keep its tensors on one device (see the module docstring)."""
    with _Strict():
        yield


def runs_on_one_device(fn, *args, **kwargs) -> str:
    """Calls ``fn`` under ``strict_devices()``; 'finished' or 'reached a value (<op>)'. A DeviceMismatch
    propagates (the test fails with the op that mixed devices)."""
    try:
        with strict_devices():
            fn(*args, **kwargs)
    except NeedsData as e:
        return f"reached a value ({e})"
    return "finished"


def to_meta(*modules) -> None:
    for m in modules:
        m.to(META)
