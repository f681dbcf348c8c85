"""The export gate's intervals (evaluation.bootstrap: FID drift by paired bootstrap, adherence drop from
the matched pairs), the selection built on them, and the re-timing of close contenders."""
import numpy as np
import pytest

from evaluation import bootstrap


def test_frechet_matches_torchmetrics():
    import torch
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(0.3, 1.2, size=(150, 8))
    ours = bootstrap.frechet(*bootstrap.moments(a), *bootstrap.moments(b))
    mu1, c1 = bootstrap.moments(a)
    mu2, c2 = bootstrap.moments(b)
    ref = float(_compute_fid(torch.from_numpy(mu1), torch.from_numpy(c1), torch.from_numpy(mu2), torch.from_numpy(c2)))
    assert ours == pytest.approx(ref, rel=1e-6)


def test_adherence_interval_covers_the_true_drop():
    """Paired right/wrong outcomes with a known drop of 10 points: the 95% interval covers it in
    about 95% of repeated experiments (>= 88% of 100 here); an identical variant gets an FID-drift
    interval of [0, 0] and a narrow adherence interval around 0."""
    rng = np.random.default_rng(1)
    ref = (np.zeros(4), np.eye(4))
    covered = 0
    for trial in range(100):
        n = 200
        base = (rng.random(n) < 0.9).astype(float)
        # the variant loses each right image with probability 1/9: 10 points in expectation
        var = base * (rng.random(n) >= 1 / 9)
        feats = rng.normal(size=(n, 4))
        ci = bootstrap.paired(feats, feats, ref, base, var, resamples=200, seed=trial)["adherence_drop_ci"]
        covered += ci[0] <= 10.0 <= ci[1]
    assert covered >= 88, covered
    same = bootstrap.paired(feats, feats, ref, base, base, resamples=50)
    lo, hi = same["adherence_drop_ci"]
    assert same["fid_drift_pct_ci"] == [0.0, 0.0] and lo == -hi and 0 < hi < 2  # 200 images, none changed


def test_no_change_in_a_few_images_does_not_certify_a_small_budget():
    """A variant that flips one image in a hundred (a 1-point drop) shows no flip in most draws of 48
    images. A bootstrap of the flips is then [0, 0] and passes a 2-point budget; the matched-pairs
    interval keeps +-3.9 points at 48 images, and narrows to +-0.25 at 800. Its coverage of the true
    drop at 48 images holds where the bootstrap's does not."""
    from export.config import ExportConfig
    from export.export import in_budget
    from export.manifest import Quality

    ones = np.ones(48)
    assert bootstrap.adherence_interval(ones, ones) == [-3.92, 3.92]
    assert bootstrap.adherence_interval(np.ones(800), np.ones(800))[1] < 0.25
    q = Quality(features="domain", fid=10, fid_drift=0, fid_drift_pct=0, fid_vs_baseline=0, psnr_db_median=50,
                ssim=1, mean_abs_px_diff=0.5, adherence=100, adherence_drop=0, within_tolerance=True,
                fid_drift_pct_ci=[0, 0], adherence_drop_ci=bootstrap.adherence_interval(ones, ones))
    assert not in_budget(q, ExportConfig(model="m", out="o"))
    rng = np.random.default_rng(5)
    ours = boot = 0
    for trial in range(300):
        base = (rng.random(48) < 0.9).astype(float)
        var = base * (rng.random(48) >= 0.01 / 0.9)  # each right image lost with p 1/90: a 1-point drop
        lo, hi = bootstrap.adherence_interval(base, var)
        ours += lo <= 1.0 <= hi
        drops = [100 * (base[i].mean() - var[i].mean()) for i in (rng.integers(0, 48, 48) for _ in range(200))]
        blo, bhi = np.quantile(drops, [0.025, 0.975])
        boot += blo <= 1.0 <= bhi
    assert ours >= 0.93 * 300 and boot < 0.75 * 300, (ours, boot)


def test_fid_drift_interval_covers_the_drift_at_its_image_count():
    """Populations with a known difference (a shift plus noise), 48 images, 16 features: the interval
    covers the expected drift measured with 48 images in about 95% of repeated experiments (the plain
    percentile interval, biased by the resamples' repeated images, covered 88% here) and always
    contains its own point estimate."""
    rng = np.random.default_rng(4)
    d, n = 16, 48
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    chol = np.linalg.cholesky(a @ a.T + 0.5 * np.eye(d))
    mu, delta, ref = rng.normal(0, 0.6, d), rng.normal(0, 0.15, d), (np.zeros(d), np.eye(d))

    def draw():
        x = mu + rng.normal(size=(n, d)) @ chol.T
        return x, x + delta + rng.normal(0, 0.2, (n, d))

    truth = np.mean([bootstrap._drift(*draw(), ref) for _ in range(300)])
    hits = np.ones(n)
    covered = own = 0
    for trial in range(40):
        x, y = draw()
        lo, hi = bootstrap.paired(x, y, ref, hits, hits, resamples=200, seed=trial)["fid_drift_pct_ci"]
        covered += lo <= truth <= hi
        own += lo <= bootstrap._drift(x, y, ref) <= hi
    assert covered >= 34 and own == 40, (covered, own, truth)


def test_fid_interval_separates_a_shift_from_noise():
    """A variant whose features are the baseline's plus a shift gets an interval away from 0; one with
    the baseline's features plus tiny noise gets a narrow interval around 0."""
    rng = np.random.default_rng(2)
    ref_feats = rng.normal(size=(2000, 6))
    ref = bootstrap.moments(ref_feats)
    base = rng.normal(0.5, 1.0, size=(64, 6))
    hits = np.ones(64)
    shifted = bootstrap.paired(base, base + 0.5, ref, hits, hits, resamples=200)["fid_drift_pct_ci"]
    noisy = bootstrap.paired(base, base + rng.normal(0, 0.01, base.shape), ref, hits, hits, resamples=200)
    assert shifted[0] > 20, shifted
    lo, hi = noisy["fid_drift_pct_ci"]
    assert lo < 0.5 and hi > -0.5 and hi - lo < 5, (lo, hi)


def test_unscored_prompts_are_left_out_and_lengths_must_match():
    ref = (np.zeros(2), np.eye(2))
    f = np.random.default_rng(3).normal(size=(10, 2))
    base = np.array([1, 1, 1, 1, 1, np.nan, np.nan, 1, 1, 1])
    var = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1, 1], dtype=float)
    ci = bootstrap.paired(f, f, ref, base, np.where(np.isnan(base), np.nan, var), resamples=100)["adherence_drop_ci"]
    # 8 scored pairs, one right -> wrong: (1 - 0) / (8 + 2) +- 1.96 sqrt(2 - 1 / 10) / 10
    half = 100 * 1.959964 * np.sqrt(2 - 1 / 10) / 10
    assert ci == pytest.approx([10 - half, 10 + half], abs=1e-2)
    with pytest.raises(ValueError, match="same images"):
        bootstrap.paired(f, f[:5], ref, base, base)


def test_selection_needs_the_whole_interval_and_breaks_latency_ties_by_exactness():
    from export.config import ExportConfig
    from export.export import in_budget, select
    from export.manifest import Bench, Latency, Quality, VariantEntry

    def entry(ms: float, drift: float, ci: list[float], drop: float = 0.0, drop_ci=(0.0, 0.0)) -> VariantEntry:
        q = Quality(features="domain", fid=10, fid_drift=drift / 10, fid_drift_pct=drift, fid_vs_baseline=0,
                    psnr_db_median=40, ssim=0.99, mean_abs_px_diff=0.1, adherence=90, adherence_drop=drop,
                    within_tolerance=True, fid_drift_pct_ci=ci, adherence_drop_ci=list(drop_ci))
        b = Bench(load_s=1, warmup_s=1, latency={1: Latency(median_s=ms / 1000, p95_s=ms / 1000, unet_step_ms=1)},
                  peak_rss_mb=100)
        return VariantEntry(status="ok", dir="x", bench=b, quality=q, tolerance_px=12.0)  # int8-like

    cfg = ExportConfig(model="m", out="o", variants=["eager-fp32", "a", "b", "c", "d"], batch_sizes=[1])
    entries = {"eager-fp32": entry(500, 0, [0, 0]),
               "a": entry(200, 1.0, [-2.0, 6.0]),  # point inside 5%, interval not: out
               "b": entry(300, 0.5, [-1.0, 2.0], drop=1.0, drop_ci=(-1.0, 3.0)),  # adherence interval out
               "c": entry(310, 0.3, [-1.0, 1.5]),  # in
               "d": entry(305, 1.0, [-1.0, 4.0])}  # in, within 5% of c and faster, but less exact
    assert [in_budget(e.quality, cfg) for e in entries.values()] == [True, False, False, True, True]
    name, why = select(entries, cfg)
    assert name == "c" and "interval" in why
    cfg0 = ExportConfig(model="m", out="o", variants=list(entries), batch_sizes=[1], latency_tie_pct=0)
    assert select(entries, cfg0)[0] == "d"
    entries["d"].quality.within_tolerance = False  # in budget, but its pixels moved more than its backend may
    assert select(entries, cfg0)[0] == "c"
    entries["d"].quality.within_tolerance = True
    # a burst from another process slowed most of d's repeats past c's; its fastest repeat still beats
    # c's, and the selector ranks by that
    entries["c"].bench.latency[1] = Latency(median_s=0.310, p95_s=0.320, min_s=0.300, unet_step_ms=1)
    entries["d"].bench.latency[1] = Latency(median_s=0.400, p95_s=0.900, min_s=0.290, unet_step_ms=1)
    assert select(entries, cfg0)[0] == "d"
    # an exact backend drawing the baseline's images is in budget whatever its intervals (a few images
    # cannot resolve them), and wins a latency tie against any approximation
    entries["b"].tolerance_px = 1.0
    assert select(entries, cfg)[0] == "b" and entries["b"].exact and not in_budget(entries["b"].quality, cfg)
    entries["b"].quality.max_image_abs_px_diff = 1.5  # one image moved more than an exact backend's may
    assert select(entries, cfg)[0] == "c" and not entries["b"].exact and not entries["b"].within_budget
    # two exact runtimes within the latency tie: the baseline's own (tolerance 0) wins, whichever timed faster
    entries["b"].quality.max_image_abs_px_diff = 0.0
    entries["eager-fp32"].tolerance_px, entries["eager-fp32"].quality.max_image_abs_px_diff = 0.0, 0.0
    entries["eager-fp32"].bench.latency[1] = Latency(median_s=0.295, p95_s=0.295, min_s=0.295, unet_step_ms=1)
    entries["b"].bench.latency[1] = Latency(median_s=0.285, p95_s=0.285, min_s=0.285, unet_step_ms=1)
    assert select(entries, cfg)[0] == "eager-fp32" and select(entries, cfg0)[0] == "b"


def test_close_contenders_are_re_timed_in_alternating_processes_and_pooled(tmp_path, monkeypatch):
    """The runner is stubbed (each "process" writes a timing); what is checked is who is re-timed, in
    which order, and how the timings pool. A failed round keeps the first benchmark's timing."""
    import json
    from pathlib import Path

    from export import export as ex
    from export.config import ExportConfig
    from export.manifest import Bench, Latency, Quality, VariantEntry

    def entry(best: float, drop_ci=(0.0, 0.0), status="ok") -> VariantEntry:
        q = Quality(features="domain", fid=10, fid_drift=0, fid_drift_pct=0, fid_vs_baseline=0, psnr_db_median=40,
                    ssim=0.99, mean_abs_px_diff=5, adherence=90, adherence_drop=0, within_tolerance=True,
                    fid_drift_pct_ci=[0, 0], adherence_drop_ci=list(drop_ci))
        lat = {1: Latency(median_s=best, p95_s=best, min_s=best, unet_step_ms=10, repeats_s=[best] * 3, processes=1),
               4: Latency(median_s=best / 2, p95_s=best / 2, min_s=best / 2, unet_step_ms=5)}
        return VariantEntry(status=status, dir="x", tolerance_px=12.0, quality=q,
                            bench=Bench(load_s=1, warmup_s=1, latency=lat, peak_rss_mb=1))

    entries = {"a": entry(0.30), "b": entry(0.40), "c": entry(0.80),  # c: more than 50% slower than a
               "d": entry(0.31, drop_ci=(0.0, 9.0))}  # out of budget: never re-timed
    cfg = ExportConfig(model="m", out=str(tmp_path), variants=list(entries), batch_sizes=[1, 4])
    (tmp_path / ".bench").mkdir()
    calls = []

    def run(cmd, timeout_s):
        name, out = cmd[4], Path(cmd[6])
        calls.append((name, cmd[cmd.index("--timing-only") + 1]))
        if name == "b" and len(calls) == 4:
            return 1, "Traceback ...\nRuntimeError: boom"
        t = {"a": 0.28, "b": 0.41}[name]
        out.write_text(json.dumps({"latency": {"1": {"median_s": t, "p95_s": t, "min_s": t, "unet_step_ms": 9.0,
                                                      "repeats_s": [t, t + 0.01, t + 0.02], "processes": 1}}}))
        return 0, ""
    monkeypatch.setattr(ex, "_run_bounded", run)
    state = {"out": tmp_path, "device": "cpu"}
    assert ex.retime(state, cfg, entries) == ["a", "b"]
    assert calls == [("b", "1"), ("a", "1"), ("a", "1"), ("b", "1")], calls  # B A, then A B; batch 1 only
    a, b = entries["a"].bench.latency, entries["b"].bench.latency
    assert a[1].processes == 3 and a[1].min_s == 0.28 and len(a[1].repeats_s) == 9 and a[1].unet_step_ms == 9.0
    assert b[1].processes == 2 and b[1].min_s == 0.40 and len(b[1].repeats_s) == 6  # one round failed
    assert a[4].processes is None and entries["c"].bench.latency[1].processes == 1  # other batch, non-contender
    assert entries["d"].bench.latency[1].processes == 1
    assert ex.select(entries, cfg)[0] == "a" and "over 3 processes" in ex.select(entries, cfg)[1]
    calls.clear()
    assert ex.retime(state, cfg.model_copy(update={"select": "b"}), entries) == [] and calls == []
    assert ex.retime(state, cfg.model_copy(update={"retime_rounds": 0}), entries) == [] and calls == []


@pytest.mark.slow
def test_the_same_model_exported_with_other_benchmark_seeds_selects_the_same_variant(micro_model, tmp_path):
    """Prompts, seeds and timing all change with the benchmark seed; the gate's intervals, the re-timing
    rounds and the latency tie rule keep the choice where it was. The second export goes into the first's
    dir, as a user re-gating a model would: it keeps the variant folders (their build reads no gate
    setting) and measures them afresh."""
    import json

    from export import reuse
    from export.manifest import read_manifest
    from tests.conftest import run_cli

    chosen, out = [], tmp_path / "export"
    for seed in (0, 1):
        # every candidate re-timed (the default re-times those within 50% of the fastest)
        res = run_cli("export", str(micro_model), "--out", str(out), "--variants", "eager-fp32,onnx-fp32,onnx-int8",
                      "--num-images", "16", "--repeats", "5", "--batch-sizes", "1", "--steps", "4",
                      "--retime-within-pct", "10000", "--seed", str(seed), timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        m = read_manifest(out)
        assert m.plan.seed == seed
        chosen.append(m.selected)
        retimed = [n for n, e in m.measured().items() if e.within_budget and e.quality.within_tolerance]
        assert len(retimed) >= 2, retimed  # eager-fp32 and onnx-fp32 at least (onnx-int8 is gated on its drift)
        for n, e in m.measured().items():
            lat = e.bench.latency[1]
            runs = 3 if n in retimed else 1  # its benchmark process, then one per round (2 rounds)
            assert lat.processes == runs and len(lat.repeats_s) == 5 * runs, (n, lat)
            assert lat.min_s == min(lat.repeats_s) and lat.min_s <= lat.median_s <= lat.p95_s
        assert "over 3 processes" in m.selection_reason
        assert "Re-timed at batch 1 in alternating processes" in (out / "bench.md").read_text()
        assert all(bool(e.reused) == bool(seed) for e in m.measured().values()), seed
        for n in m.measured():  # the benchmark processes leave the folders as they were built
            assert reuse.folder_digest(out / n) == json.loads((out / n / reuse.BUILD_FILE).read_text())["digest"]
        assert ("eager-fp32: kept from the export of" in res.stdout) == bool(seed)
    assert chosen[0] is not None and chosen[0] == chosen[1], chosen


def test_the_gate_measures_fid_against_given_references_and_leaves_adherence_off_the_world():
    """A model of real images is gated against the user's own images (the synthetic world's renders say
    nothing about photos), and prompts the domain classifier cannot read carry no adherence score, so
    only the FID budget decides."""
    from evaluation.classifier import load_classifier
    from evaluation.fid import fid
    from export.config import ExportConfig
    from export.export import BASELINE, in_budget, quality
    from export.manifest import VariantEntry

    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    base = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    var = np.clip(base.astype(int) + 40, 0, 255).astype(np.uint8)
    items = [{"prompt": f"a photo of my dog, take {i}", "scene": None, "split": "all"} for i in range(8)]
    entries = {n: VariantEntry(status="ok", dir=n, tolerance_px=1.0) for n in (BASELINE, "v")}
    cfg = ExportConfig(model="m", out="o", features="domain", bootstrap_resamples=20, references="my-photos",
                       max_fid_drift=1e6, max_adherence_drop=0.0)
    quality(entries, {BASELINE: base, "v": var}, items, cfg, refs)
    q = entries["v"].quality
    assert q.fid == round(fid(var, refs, "domain", load_classifier()), 3) and q.reference_images == 24
    assert q.adherence is None and q.adherence_drop is None and q.adherence_drop_ci is None
    assert in_budget(q, cfg)  # a zero adherence budget does not apply where adherence is not measured
    assert not in_budget(q, cfg.model_copy(update={"max_fid_drift": abs(q.fid_drift_pct) / 2}))
    # a caption that names a shape and a colour is still a caption: not read by the domain classifier
    items = [{"prompt": "a man in a red shirt with a blue heart tattoo", "scene": None, "split": "all",
              "scored": False}] * 8
    quality(entries, {BASELINE: base, "v": var}, items, cfg, refs)
    assert entries["v"].quality.adherence is None
    # prompts of the synthetic world keep their adherence score against the same references
    items = [{"prompt": "a red circle on the left", "scene": None, "split": "all"}] * 8
    quality(entries, {BASELINE: base, "v": var}, items, cfg, refs)
    assert entries["v"].quality.adherence is not None and entries["v"].quality.adherence_drop_ci is not None
