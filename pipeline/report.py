"""report.html and report.md of a pipeline run: config, loss curve, base vs fine-tuned samples on the
same prompts and seeds, the evaluation table, the latency-vs-drift plot and bench table, and how to
serve. The HTML embeds its images (one file to mail or attach to a ticket); the Markdown links the
copies under report/."""
from __future__ import annotations

import base64
import html
import os
import shutil
from pathlib import Path

from core.io import read_json_file


def loss_curve(train_dir: Path, path: Path) -> bool:
    """Plots the TensorBoard 'loss' scalar (raw and smoothed); False when there are no logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for events in sorted((train_dir / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("loss"):
                steps.append(ev.step)
                values.append(ev.value)
    if not steps:
        return False
    pairs = sorted(dict(zip(steps, values)).items())  # a resumed run logs some steps twice: keep the last
    steps, values = [p[0] for p in pairs], [p[1] for p in pairs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth, ema = [], values[0]
    for v in values:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(steps, values, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label="smoothed (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _md_table_to_html(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.strip().splitlines() if r.strip().startswith("|")]
    rows = [r for r in rows if not set("".join(r).strip()) <= set("-: ")]
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _eval_rows(cmp: dict) -> list[list[str]]:
    rows = [["concepts", "adherence before", "adherence after", "all attrs before", "all attrs after",
             "FID before", "FID after", "FID change"]]
    for split, r in cmp["summary"].items():
        rows.append([split, or_dash(r["adherence_before"], "%"), or_dash(r["adherence_after"], "%"),
                     or_dash(r["adherence_all_before"], "%"), or_dash(r["adherence_all_after"], "%"),
                     or_dash(r["fid_before"]), or_dash(r["fid_after"]), or_dash(r.get("fid_change_pct"), "%")])
    return rows


def or_dash(v, unit: str = "") -> str:
    """A figure with its unit, or '-' where it was not measured (adherence of images outside the world)."""
    return "-" if v is None else f"{v}{unit}"


def write_report(out: Path, cfg, state: dict) -> None:
    from export.manifest import read_manifest
    from export.report import bench_table, resolution

    out = Path(out)
    assets = out / "report"
    assets.mkdir(exist_ok=True)
    images: list[tuple[str, str, str]] = []  # (section, file under report/, caption)
    if loss_curve(out / "train", assets / "loss.png"):
        images.append(("Training", "loss.png", "Training loss (TensorBoard scalar 'loss')"))
    samples = sorted((out / "train" / "samples").glob("*.png"))
    if samples:
        shutil.copy(samples[-1], assets / "train_samples.png")
        images.append(("Training", "train_samples.png", f"Validation prompts at the last sample step ({samples[-1].stem}): "
                       + "; ".join(cfg.training.logging.validation_prompts)))
    cmp_path = out / "eval" / "compare.json"
    cmp = read_json_file(cmp_path, "eval result", "re-run with --force eval") if cmp_path.exists() else None
    if (out / "eval" / "before_after.png").exists():
        shutil.copy(out / "eval" / "before_after.png", assets / "before_after.png")
        images.append(("Evaluation", "before_after.png", "Top row: the starting model; bottom row: the fine-tuned "
                       "model; same prompt and seed per column (prompts of the newly taught concepts)"))
    manifest = read_manifest(out / "export") if (out / "export" / "export.json").exists() else None
    if manifest and (out / "export" / "bench.png").exists():
        shutil.copy(out / "export" / "bench.png", assets / "bench.png")
        images.append(("Export", "bench.png", "Latency per image against FID drift; star = selected, dashed = Pareto front"))
    bento = read_json_file(out / "bento.json", "bento record", "re-run with --force bento") \
        if (out / "bento.json").exists() else {}
    config_yaml = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else ""
    serve = [f"t2i serve {out / 'export'} --port 3000"]
    if bento.get("tag"):
        serve += [f"bentoml serve {bento['tag']}", f"bentoml containerize {bento['tag']}"]
    serve.append("curl -X POST localhost:3000/generate -H 'Content-Type: application/json' "
                 "-d '{\"prompt\": \"a purple star on the left\"}' -o star.png")
    stages = [[k, f"{v.get('seconds', '-')} s", v.get("result", "")] for k, v in state.get("stages", {}).items()]

    # -- Markdown -----------------------------------------------------------------------------
    md = [f"# t2i pipeline report: {out.name}", "", "## Stages", "", "| stage | time | result |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in stages]
    for section in ("Training", "Evaluation", "Export"):
        md += ["", f"## {section}", ""]
        if section == "Evaluation" and cmp:
            rows = _eval_rows(cmp)
            md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            md += ["", f"Adherence = shape and colour both right (domain classifier), %. FID features: {cmp['features']}.", ""]
        if section == "Export" and manifest:
            md += [resolution(manifest) + bench_table(manifest), "",
                   f"Selected: **{manifest.selected}** ({manifest.selection_reason})", ""]
        md += [f"![{cap}](report/{f})\n\n*{cap}*\n" for s, f, cap in images if s == section]
    md += ["## Serving", "", "```", *serve, "```", "", "## Config", "", "```yaml", config_yaml, "```", ""]
    _atomic_write(out / "report.md", "\n".join(md))

    # -- HTML (images embedded) -------------------------------------------------------------------
    def img(f: str, cap: str) -> str:
        from PIL import Image

        raw = (assets / f).read_bytes()
        width = Image.open(assets / f).size[0]
        scale = max(1, min(4, 900 // max(width, 1)))  # 64-pixel sample grids are unreadable at 1:1
        data = base64.b64encode(raw).decode()
        return (f'<figure><img src="data:image/png;base64,{data}" width="{width * scale}" alt="{html.escape(cap)}">'
                f"<figcaption>{html.escape(cap)}</figcaption></figure>")

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>t2i pipeline report: {html.escape(out.name)}</h1>", "<h2>Stages</h2>",
             table([["stage", "time", "result"], *stages])]
    for section in ("Training", "Evaluation", "Export"):
        parts.append(f"<h2>{section}</h2>")
        if section == "Evaluation" and cmp:
            parts.append(table(_eval_rows(cmp)))
            parts.append(f"<p>Adherence = shape and colour both right (domain classifier), %. "
                         f"FID features: {html.escape(cmp['features'])}.</p>")
        if section == "Export" and manifest:
            parts.append(_md_table_to_html(bench_table(manifest)))
            parts.append(f"<p>Selected: <b>{html.escape(str(manifest.selected))}</b> "
                         f"({html.escape(manifest.selection_reason)})</p><p>{html.escape(resolution(manifest))}</p>")
        parts += [img(f, cap) for s, f, cap in images if s == section]
    parts += ["<h2>Serving</h2>", f"<pre>{html.escape(chr(10).join(serve))}</pre>",
              "<h2>Config</h2>", f"<pre>{html.escape(config_yaml)}</pre>"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>t2i report: {html.escape(out.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1em 0; }} figure img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ font-size: 13px; color: #555; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 12px; }}
</style></head>
<body>
{chr(10).join(parts)}
<script>
// For people: nothing. For the render test: records how many images decoded.
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
}});
</script>
</body></html>
"""
    _atomic_write(out / "report.html", page)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
