"""The public loader: serving (and anyone else) loads an export dir's variant through here.

    from export.loader import load
    gen = load("runs/demo/export")            # the selected variant
    images = gen.generate([GenerationRequest("a red circle on the left", seed=1)])
"""
from __future__ import annotations

import logging
from pathlib import Path

from core.models import default_device  # noqa: F401 - part of the loader's API
from export.manifest import read_manifest

log = logging.getLogger("bentoml.t2i")  # printed by BentoML's handlers in a server's log, by logging's elsewhere


def check(export_dir: str | Path, variant: str | None = None, trusted: bool = False) -> tuple[str, str | None]:
    """(variant name, what code it ships and why that may run, or None when it ships none), without
    loading anything; a UserError line when the variant cannot load or its code is not trusted."""
    from export import trust
    from export.variants import check_folder, get

    name, entry = read_manifest(export_dir).variant(variant, export_dir)
    code = trust.check(Path(export_dir) / entry.dir, trusted)
    check_folder(get(name), Path(export_dir) / entry.dir)
    return name, code


def choose_device(variant, built_on: str | None, requested: str | None = None) -> str:
    """The device to run on: ``requested`` when given, else this machine's (cuda where available).
    When that differs from the device the export was built and measured on, a warning says so; a
    variant that cannot run on this machine's device falls back to the build device where this
    machine has it, and is a UserError otherwise."""
    from core.errors import UserError

    if requested:
        return requested
    here = default_device()
    if not built_on or built_on == here:
        return here
    reason = variant.unsupported(here)
    if reason is None:
        log.warning("this export was built and benchmarked on %s; running it on this machine's %s (its latency "
                    "figures are the %s ones; set T2I_DEVICE=%s to run where it was measured)", built_on, here,
                    built_on, built_on)
        return here
    if built_on == "cpu":
        log.warning("running on the cpu, where this export was built: on %s it cannot run (%s)", here, reason)
        return "cpu"
    raise UserError(f"this export was built for {built_on} and its variant cannot run on this machine's {here} "
                    f"({reason}); pick a variant that can (--variant / T2I_VARIANT) or re-run `t2i export` here")


def load(export_dir: str | Path, variant: str | None = None, device: str | None = None, trusted: bool = False):
    """Loads ``variant`` (default: the manifest's selected one) from disk on ``device`` (default: this
    machine's, see ``choose_device``); returns a Generator. Weights load as data; a variant that ships
    code (the compile variant's Inductor cache, int8-static's AOTInductor package) loads only when that
    code was built on this machine or ``trusted`` is set (see ``export.trust``)."""
    from export.variants import get

    manifest = read_manifest(export_dir)
    name, entry = manifest.variant(variant, export_dir)
    v = get(name)
    gen = v.load(Path(export_dir) / entry.dir, choose_device(v, manifest.device, device), trusted=trusted)
    gen.info = {**gen.info, "variant": name,
                "bench": entry.bench.model_dump(mode="json") if entry.bench else {},
                "quality": entry.quality.model_dump(mode="json") if entry.quality else {}}
    return gen
