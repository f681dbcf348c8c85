"""``t2i export``: build optimized variants of a model dir, benchmark each one's latency against
its quality drift from eager-fp32 on the same prompts, seeds, scheduler and steps, and select the
fastest variant inside the quality budget.  ``main(cfg)`` = setup -> run -> save.

Writes EXPORT_DIR/<variant>/ (each loadable from disk alone), export.json (the manifest),
bench.md (the table) and bench.png (latency vs FID drift, Pareto front marked).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from core.errors import UserError
from core.io import atomic_dir
from export import reuse
from export.common import dir_size_mb, latency_stats, matmul_peak_gflops, unet_flops
from export.config import ExportConfig
from export.manifest import (Bench, Budget, ExportManifest, Hardware, Latency, LoadHint, Plan, Quality,
                             VariantEntry, write_manifest)

BASELINE = "eager-fp32"


def plan_for(cfg: ExportConfig, captions: list[str] | None = None) -> tuple[dict, list[dict]]:
    """The benchmark plan and the quality items ({prompt, scene, split}): the prompts file's lines, else
    a seeded sample of the references' ``captions``, else the synthetic world's fixed prompt set."""
    from evaluation.evaluate import EvalConfig, prompt_set

    items = prompt_set(EvalConfig(num_images=cfg.num_images, seed=cfg.seed, features=cfg.features,
                                  prompts=cfg.prompts), captions)
    if cfg.references is None and not any(it["scene"] for it in items):
        raise UserError(f"none of the quality prompts in {cfg.prompts} describes the synthetic world, so there "
                        "are no reference images to measure FID against: set export.references to a dataset "
                        "of real images (e.g. the fine-tune's own data)")
    prompts = [it["prompt"] for it in items]
    plan = {"batch_sizes": cfg.batch_sizes, "steps": cfg.steps, "guidance": cfg.guidance,
            "repeats": cfg.repeats, "prompts": prompts * (1 + max(cfg.batch_sizes) * cfg.repeats // len(prompts)),
            "quality_prompts": prompts, "quality_seeds": [cfg.seed + i for i in range(len(prompts))],
            # the largest timed batch: a compiled variant then draws them with graphs its build warmed
            "quality_batch": max(cfg.batch_sizes)}
    return plan, items


# ============================================================================ setup

def setup(cfg: ExportConfig) -> dict:
    from export.loader import default_device
    from export.variants import get
    from core.models import resolve_model

    path, local = resolve_model(cfg.model)
    if not local:
        raise UserError("export needs a local model dir (download the hub model first)")
    for name in cfg.variants:
        get(name)  # unknown names fail here, before anything is written
    if cfg.select and cfg.select not in cfg.variants:
        raise UserError(f"--select {cfg.select} is not among the variants built: {cfg.variants}")
    if any(b < 1 for b in cfg.batch_sizes):
        raise UserError("batch sizes must be positive")
    from evaluation.fid import make_metric, resolve_features

    if resolve_features(cfg.features) == "inception":
        make_metric("inception")  # missing torch-fidelity or weights fail here, before any variant is built
    device = cfg.device or default_device()
    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device} must be cpu or cuda")
    out = Path(cfg.out)
    if out.exists() and not (out / "export.json").exists():
        # an interrupted export leaves variant folders (with build.json) and maybe a half-built one's .tmp
        found = [d for d in out.iterdir() if d.name != ".bench" and not d.name.endswith((".tmp", ".old"))]
        if found and not any((d / reuse.BUILD_FILE).is_file() for d in found):
            raise UserError(f"{out} exists and is not an export dir; choose another --out")
    names = [BASELINE] + [n for n in cfg.variants if n != BASELINE]
    # approximate variants after the exact ones they build on; onnx-fp32 before the ONNX variants that
    # convert its checked export
    names.sort(key=lambda n: ("+" in n, n.startswith("onnx-") and n != "onnx-fp32"))
    from core.models import model_meta
    from evaluation.evaluate import dataset_references, reference_captions

    captions, refs = None, None
    if cfg.references:  # a bad dataset fails here, before any variant is built
        captions = reference_captions(cfg.references)
        refs = dataset_references(cfg.references, model_meta(Path(path))["native_size"])
    return {"model": Path(path), "out": out, "device": device, "names": names, "captions": captions,
            "references": refs}


# ============================================================================ run

def calibration_prompts(state: dict, cfg: ExportConfig, n: int = 8) -> tuple[list[str], int]:
    """``n`` prompts a static quantizer calibrates on, drawn like the gate's but outside them where the
    prompt source has more (a prompts file's later lines, other captions, other scenes); and how many
    of them are among the gate's prompts (all of them when the source has no others)."""
    from evaluation.evaluate import EvalConfig, prompt_set

    gate = set(plan_for(cfg, state["captions"])[0]["quality_prompts"])
    pool = prompt_set(EvalConfig(num_images=cfg.num_images + 8 * n, seed=cfg.seed + 7919, features=cfg.features,
                                 prompts=cfg.prompts), state["captions"])
    pool = list(dict.fromkeys(it["prompt"] for it in pool))
    fresh = [p for p in pool if p not in gate]
    prompts = (fresh + [p for p in pool if p in gate])[:n]
    return prompts, sum(p in gate for p in prompts)


def build_variants(state: dict, cfg: ExportConfig) -> dict[str, VariantEntry]:
    from export.variants import get

    entries: dict[str, VariantEntry] = {}
    ctx = {"batch_sizes": cfg.batch_sizes, "built": {}, "notes": {},  # approximate variants reuse a built base
           "steps": cfg.steps, "guidance": cfg.guidance}
    ctx["calibration_prompts"], ctx["calibration_overlap"] = calibration_prompts(state, cfg)
    ctx["keys"], common = {}, reuse.common_inputs(state["model"], state["device"])
    bar = tqdm(state["names"], desc="building variants", unit="variant")
    for name in bar:
        variant = get(name)
        reason = variant.unsupported(state["device"])
        if reason:
            entries[name] = VariantEntry(status="skipped", reason=reason)
            continue
        final = state["out"] / name
        made_from = reuse.made_from(common, name, ctx)
        key = reuse.key_of(made_from)
        kept, why = reuse.reusable(final, made_from)
        if kept is not None and cfg.rebuild:
            kept, why = None, "rebuild=true"
        if why:
            bar.write(f"{name}: building it again ({why})")
        if kept is not None:  # built by an earlier export into this dir from the same inputs, unchanged since
            bar.write(f"{name}: kept from the export of {kept['built']} (same model, settings and code)")
            notes, build_s = kept["notes"], kept["build_s"]
        else:
            t0 = time.perf_counter()
            try:
                with atomic_dir(final) as tmp:
                    notes = variant.build(state["model"], tmp, state["device"], ctx)
                    reuse.record(tmp, made_from, round(time.perf_counter() - t0, 1), notes)
            except UserError as e:
                entries[name] = VariantEntry(status="failed", reason=str(e))
                continue
            except Exception as e:  # a backend that breaks on this model/hardware: report, don't crash
                entries[name] = VariantEntry(status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            build_s = round(time.perf_counter() - t0, 1)
        ctx["built"][name], ctx["notes"][name], ctx["keys"][name] = final, notes, key
        entries[name] = VariantEntry(
            status="ok", dir=name, build_s=build_s, reused=True if kept is not None else None,
            size_mb=dir_size_mb(final), tolerance_px=variant.TOLERANCE, notes=notes,
            load=LoadHint(registry=name, call=f"export.loader.load(EXPORT_DIR, '{name}')"))
    return entries


def bench_variants(state: dict, cfg: ExportConfig, entries: dict[str, VariantEntry],
                   plan: dict) -> dict[str, np.ndarray]:
    work = state["out"] / ".bench"
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan))
    images = {}
    for name, e in tqdm([(n, e) for n, e in entries.items() if e.status == "ok"], desc="benchmarking",
                        unit="variant"):
        res, npy = work / f"{name}.json", work / f"{name}.npy"
        why = _bench_worker(state, cfg, name, res, str(npy))
        if why:  # a hung or broken backend must not hang or crash the export
            e.reason, e.status = f"benchmark {why}", "failed"  # a failed entry must carry its reason
            (state["out"] / name / reuse.BUILD_FILE).unlink(missing_ok=True)  # the next export builds it afresh
            continue
        e.bench = Bench.model_validate_json(res.read_text())
        images[name] = np.load(npy)
    return images


def _bench_worker(state: dict, cfg: ExportConfig, name: str, out: Path, *args: str) -> str | None:
    """Runs ``export.bench_worker`` on variant ``name`` (results to ``out``); why it failed, or None."""
    cmd = [sys.executable, "-m", "export.bench_worker", str(state["out"] / name), name,
           str(state["out"] / ".bench" / "plan.json"), str(out), *args, "--device", state["device"]]
    returncode, stderr = _run_bounded(cmd, cfg.bench_timeout_s)
    if returncode is None:
        return f"did not finish within bench_timeout_s={cfg.bench_timeout_s:g} s; stopped"
    return None if returncode == 0 else "failed: " + (stderr.strip().splitlines() or ["?"])[-1]


def _run_bounded(cmd: list[str], timeout_s: float) -> tuple[int | None, str]:
    """(exit code, stderr) of ``cmd``; (None, stderr) when it ran past ``timeout_s`` and was killed with
    every process it started (its own process group: compile workers included)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[1]
    except BaseException:  # Ctrl-C: the worker is in its own session, so stop it here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def quality(entries: dict[str, VariantEntry], images: dict[str, np.ndarray], items: list[dict],
            cfg: ExportConfig, references: np.ndarray | None = None) -> None:
    """Each variant's images against the reference images (given, else the references dataset's, else
    renders of the prompts' scenes) and against the baseline's; adherence where the prompts are the
    synthetic world's."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from evaluation import bootstrap
    from evaluation.classifier import load_classifier
    from evaluation.evaluate import (EvalConfig, adherence, adherence_hits, dataset_references, reference_images,
                                     scored_prompts)
    from evaluation.fid import fid, resolve_features

    kind = resolve_features(cfg.features)
    clf = load_classifier()  # adherence always; FID features too when kind == "domain"
    ecfg = EvalConfig(num_images=cfg.num_images, seed=cfg.seed, features=cfg.features)
    base = images[BASELINE]
    if references is not None:
        ref = references
    elif cfg.references:
        ref = dataset_references(cfg.references, base.shape[1])
    else:
        ref = reference_images(items, ecfg.seed, per_prompt=ecfg.reference_per_prompt)
    prompts = scored_prompts(items)  # what adherence reads: a dataset's captions are never scored
    base_fid = fid(base, ref, kind, clf)
    base_hits = adherence_hits(base, prompts, clf)
    scored = not np.isnan(base_hits).all()  # no prompt of the synthetic world: adherence is not measured
    base_adh = adherence(base, prompts, clf)["shape+colour"] if scored else None
    bt = torch.from_numpy(base).permute(0, 3, 1, 2).float() / 255
    # the gate's intervals: the same image indices resampled for the baseline and each variant
    ref_moments = bootstrap.moments(bootstrap.features(ref, kind, clf))
    base_feats = bootstrap.features(base, kind, clf)
    for name, imgs in images.items():
        f = fid(imgs, ref, kind, clf)
        hits = adherence_hits(imgs, prompts, clf)
        adh = adherence(imgs, prompts, clf)["shape+colour"] if scored else None
        ci = bootstrap.paired(base_feats, bootstrap.features(imgs, kind, clf), ref_moments, base_hits,
                              hits, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
        vt = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        psnr = [float(peak_signal_noise_ratio(vt[i:i + 1], bt[i:i + 1], data_range=1.0)) for i in range(len(vt))]
        ssim = float(structural_similarity_index_measure(vt, bt, data_range=1.0))
        per_image = np.abs(imgs.astype(np.float32) - base.astype(np.float32)).mean(axis=(1, 2, 3))
        mad = float(per_image.mean())
        drift = f - base_fid
        entries[name].quality = Quality(
            features=kind, fid=round(f, 3), fid_drift=round(drift, 3),
            fid_drift_pct=round(100 * drift / base_fid, 2) if base_fid > 0 else 0.0,
            fid_vs_baseline=round(fid(imgs, base, kind, clf, cache=False), 3) if name != BASELINE else 0.0,
            psnr_db_median=round(float(np.median([p if np.isfinite(p) else 100.0 for p in psnr])), 2),
            ssim=round(ssim, 4), mean_abs_px_diff=round(mad, 3), max_image_abs_px_diff=round(float(per_image.max()), 3),
            adherence=adh, adherence_drop=round(base_adh - adh, 1) if scored else None,
            within_tolerance=mad <= entries[name].tolerance_px, reference_images=len(ref),
            fid_drift_pct_ci=ci["fid_drift_pct_ci"], adherence_drop_ci=ci["adherence_drop_ci"] if scored else None,
        )


# An exact backend's parity tolerance (mean abs difference from eager-fp32, of 255 levels): fp32 in ONNX
# Runtime (1) or Inductor (2). Quantized, half-precision and approximate variants allow 6 and more.
EXACT_TOLERANCE_PX = 2.0


def _measured(entries: dict[str, VariantEntry], cfg: ExportConfig) -> dict[str, VariantEntry]:
    """The benchmarked, quality-measured variants, each one's ``exact`` and ``within_budget`` set.

    An exact variant draws the baseline's images (checked on every gate image), so its quality is the
    baseline's: it is in budget without the intervals, which at a few dozen images cannot resolve a
    2-point budget for any variant (no change in 48 images still leaves +-3.9 points)."""
    ok = {n: e for n, e in entries.items() if e.status == "ok" and e.bench is not None and e.quality is not None}
    for e in ok.values():
        q = e.quality
        worst = q.max_image_abs_px_diff if q.max_image_abs_px_diff is not None else q.mean_abs_px_diff
        e.exact = e.tolerance_px is not None and worst <= e.tolerance_px <= EXACT_TOLERANCE_PX
        e.within_budget = e.exact or in_budget(q, cfg)
    return ok


def _candidates(ok: dict[str, VariantEntry], cfg: ExportConfig) -> list[str]:
    """In budget, and (exact variants) no further from the baseline's pixels than its backend may be."""
    return [n for n, e in ok.items() if e.within_budget and e.quality.within_tolerance and n in cfg.variants]


def retime(state: dict, cfg: ExportConfig, entries: dict[str, VariantEntry]) -> list[str]:
    """Time the close contenders for selection again, at the smallest batch size, in rounds of fresh
    processes (A B, then B A, ...), and pool every repeat into their latency. Returns the re-timed names.

    Each variant's benchmark process times all its repeats within a few seconds; a slow spell of a
    shared host lasts about as long, and slowed every repeat of one process by up to 45% here (the
    same variant, 0.34 s/image in one process and 0.49 in the next), which flipped the selection
    between onnx-int8 and onnx-fp32 across runs of the demo. Alternating processes spread each
    contender's timing over the whole comparison, and the best repeat of all of them is what a slow
    spell cannot reach."""
    if cfg.retime_rounds < 1 or cfg.select:
        return []
    ok = _measured(entries, cfg)
    b1 = min(cfg.batch_sizes)
    lat = {n: ok[n].bench.latency[b1].rank_s for n in _candidates(ok, cfg)}
    if len(lat) < 2:
        return []
    fastest = min(lat.values())
    contenders = sorted((n for n in lat if lat[n] <= fastest * (1 + cfg.retime_within_pct / 100)), key=lat.get)
    if len(contenders) < 2:
        return []
    work = state["out"] / ".bench"
    runs = [n for r in range(cfg.retime_rounds) for n in (contenders if r % 2 else contenders[::-1])]
    timed: dict[str, list[dict]] = {n: [] for n in contenders}
    for i, name in enumerate(tqdm(runs, desc=f"re-timing {len(contenders)} contenders", unit="run")):
        res = work / f"{name}.retime{i}.json"
        why = _bench_worker(state, cfg, name, res, "--timing-only", str(b1))
        if why:  # it was timed once already: keep that, and say why this round is missing
            tqdm.write(f"warning: re-timing {name}: {why}; its first benchmark's timing stands")
        else:
            timed[name].append(json.loads(res.read_text())["latency"][str(b1)])
    for name, extra in timed.items():
        first = entries[name].bench.latency[b1]
        pooled = list(first.repeats_s or [first.rank_s]) + [t for x in extra for t in x["repeats_s"]]
        steps = [first.unet_step_ms] + [x["unet_step_ms"] for x in extra]
        entries[name].bench.latency[b1] = Latency(**latency_stats(pooled, min(steps), 1 + len(extra)))
    return contenders


def select(entries: dict[str, VariantEntry], cfg: ExportConfig) -> tuple[str | None, str]:
    ok = _measured(entries, cfg)
    if cfg.select:
        if cfg.select not in ok:
            why = entries[cfg.select].reason if cfg.select in entries else None
            raise UserError(f"--select {cfg.select}: that variant did not build/benchmark ({why or 'not built'})")
        return cfg.select, "chosen with --select"
    b1 = min(cfg.batch_sizes)
    candidates = _candidates(ok, cfg)
    if not candidates:
        return None, "no variant is inside the budget"
    # ranked by each variant's fastest repeat: a burst from another process slows one repeat of one
    # variant, and the median of a few repeats would carry it into the choice
    lat = {n: ok[n].bench.latency[b1].rank_s for n in candidates}
    fastest = min(lat.values())
    # variants within latency_tie_pct of the fastest are a tie (timing noise): the most exact one wins,
    # so the same model exported twice selects the same variant
    tied = [n for n in candidates if lat[n] <= fastest * (1 + cfg.latency_tie_pct / 100)]
    # exact ones first, the baseline's own runtime before another (its tolerance); then the smallest drift
    best = min(tied, key=lambda n: (0, ok[n].tolerance_px, lat[n]) if ok[n].exact
               else (1, _worst_drift(ok[n].quality), lat[n]))
    measured = ok[best].quality.adherence is not None
    adh = f" and of adherence drop under {cfg.max_adherence_drop} pts" if measured else ""
    runs = ok[best].bench.latency[b1].processes or 1
    timing = (f"best of {cfg.repeats * runs} repeats over {runs} processes, {runs - 1} of them alternating "
              "re-timing rounds" if runs > 1 else f"best of {cfg.repeats} repeats")
    why = ("exact: every gate image the baseline's within its runtime's rounding" if ok[best].exact
           else f"the {100 * CONFIDENCE:.0f}% intervals of FID drift inside +-{cfg.max_fid_drift}%{adh}")
    why += "" if measured else " (adherence not measured: no prompt of the synthetic world)"
    return best, (f"fastest at batch {b1} ({timing}; ties within {cfg.latency_tie_pct:g}% go to the most exact) "
                  f"in budget: {why}")


CONFIDENCE = 0.95


def _worst_drift(q) -> float:
    """The largest |FID drift| the interval allows, plus the adherence drop's upper end."""
    lo, hi = q.fid_drift_pct_ci or [q.fid_drift_pct] * 2
    if q.adherence_drop is None:
        return max(abs(lo), abs(hi))
    return max(abs(lo), abs(hi)) + max(0.0, (q.adherence_drop_ci or [0, q.adherence_drop])[1])


def in_budget(q, cfg: ExportConfig) -> bool:
    """Inside the budget when the whole interval is: drift either way is a change from the original
    model, so the budget bounds its size; adherence may rise freely."""
    lo, hi = q.fid_drift_pct_ci or [q.fid_drift_pct] * 2
    fid_ok = max(abs(lo), abs(hi), abs(q.fid_drift_pct)) <= cfg.max_fid_drift
    if q.adherence_drop is None:  # not measured (prompts outside the synthetic world): FID decides
        return fid_ok
    drop_hi = (q.adherence_drop_ci or [q.adherence_drop] * 2)[1]
    return fid_ok and max(drop_hi, q.adherence_drop) <= cfg.max_adherence_drop


# ============================================================================ save

def save(state: dict, cfg: ExportConfig, entries: dict[str, VariantEntry], selected: str | None, reason: str,
         hw: Hardware) -> ExportManifest:
    from export.report import write_bench_md, write_plot

    manifest = ExportManifest(
        model_dir=str(state["model"]), device=state["device"], created=time.strftime("%Y-%m-%d %H:%M:%S"),
        config=cfg.model_dump(mode="json"),
        budget=Budget(max_fid_drift_pct=cfg.max_fid_drift, max_adherence_drop_pts=cfg.max_adherence_drop,
                      gate_images=cfg.num_images, resamples=cfg.bootstrap_resamples, confidence=CONFIDENCE),
        plan=Plan.model_validate(cfg.model_dump(include=set(Plan.model_fields))),
        baseline=BASELINE, hardware=hw, variants=entries, selected=selected, selection_reason=reason)
    out = state["out"]
    write_plot(manifest, out / "bench.png")
    write_bench_md(manifest, out / "bench.md")
    write_manifest(out / "export.json", manifest)
    shutil.rmtree(out / ".bench", ignore_errors=True)
    reuse.remove_stale(out, {e.dir for e in entries.values() if e.dir})
    return manifest


def main(cfg: ExportConfig) -> ExportManifest:
    state = setup(cfg)
    plan, items = plan_for(cfg, state["captions"])
    state["out"].mkdir(parents=True, exist_ok=True)
    for f in ("export.json", "bench.md", "bench.png"):  # an earlier export's: its folders are about to change
        (state["out"] / f).unlink(missing_ok=True)
    entries = build_variants(state, cfg)
    images = bench_variants(state, cfg, entries, plan)
    if BASELINE not in images:
        raise UserError(f"the baseline {BASELINE} failed: {entries[BASELINE].reason}")
    quality(entries, images, items, cfg, state["references"])
    retime(state, cfg, entries)
    flops = unet_flops(state["model"])
    peak = matmul_peak_gflops(device=state["device"])
    for e in entries.values():
        if e.status == "ok":
            ms = e.bench.latency[min(cfg.batch_sizes)].unet_step_ms
            e.bench.unet_gflops_per_s = round(flops / (ms / 1000) / 1e9, 1) if ms else None
            e.bench.unet_fraction_of_fp32_peak = round(e.bench.unet_gflops_per_s / peak, 3) if ms else None
    selected, reason = select(entries, cfg)
    torch = __import__("torch")
    hw = Hardware(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  matmul_fp32_gflops=peak, unet_gflop_per_step_b1=round(flops / 1e9, 3),
                  gpu=torch.cuda.get_device_name() if state["device"] == "cuda" else None)
    manifest = save(state, cfg, entries, selected, reason, hw)
    if selected is None:
        measured = any(e.quality and e.quality.adherence is not None for e in entries.values())
        adh = f"adherence drop <= {cfg.max_adherence_drop} pts" if measured else "adherence not measured"
        raise UserError(f"no variant meets the budget (FID drift <= {cfg.max_fid_drift}%, {adh}); see "
                        f"{state['out']}/bench.md, or pass --select NAME")
    return manifest
