"""A report per training run: PNG plots and one HTML page, stored with the model version.

Plots use matplotlib's object API (``Figure`` renders with Agg), so no GUI backend or global
pyplot state is touched; matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from training.evaluate import Evaluation

REPORT_DIR = "report"  # files are stored as {version}/report/<name>
INDEX = "index.html"
PLOTS = {
    "metrics.png": "Metrics per epoch (validation set)",
    "lr_find.png": "lr_find: loss against learning rate",
    "losses.png": "Loss curves",
    "per_tag.png": "Per-tag precision, recall and F2 on the holdout",
}
LOG_SCALE_RATIO = 20  # per-epoch losses spanning more than this use a log axis
TAG_ROW_IN = 0.22  # inches of figure height per tag in the per-tag chart


def _figure(width_in: float = 8.0, height_in: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")


def plot_metrics(epochs: list[dict], path: Path) -> None:
    fig = _figure()
    ax = fig.subplots()
    x = [e["epoch"] for e in epochs]
    for name in ("f2", "accuracy_multi"):
        ys = [e.get(name) for e in epochs]
        if any(y is not None for y in ys):
            ax.plot(x, ys, marker="o", label=name)
    _mark_unfreeze(ax, epochs)
    ax.set(xlabel="epoch", ylabel="score", title=PLOTS["metrics.png"], ylim=(0, 1))
    ax.legend()
    fig.savefig(path)


def _mark_unfreeze(ax, epochs: list[dict]) -> None:
    first = next((e["epoch"] for e in epochs if e.get("phase") == "unfrozen"), None)
    if first is not None and first > 1:
        ax.axvline(first - 0.5, color="grey", linestyle="--", label="unfreeze()")


def plot_lr_find(curve: dict, lr: float, path: Path) -> None:
    fig = _figure()
    ax = fig.subplots()
    ax.plot(curve.get("lrs", []), curve.get("losses", []))
    ax.axvline(lr, color="red", linestyle="--", label=f"chosen {lr:.2e}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="loss (smoothed)", title=PLOTS["lr_find.png"])
    ax.legend()
    fig.savefig(path)


def plot_losses(batch_losses: list[dict], epochs: list[dict], path: Path) -> None:
    fig = _figure()
    left, right = fig.subplots(1, 2)
    offset = 0
    for fit in batch_losses:
        ys = fit["losses"]
        left.plot(range(offset, offset + len(ys)), ys, label=f"train ({fit['phase']})")
        offset += len(ys)
    left.set(xlabel="batch", ylabel="loss (smoothed)", title="training loss per batch")
    left.legend()
    x = [e["epoch"] for e in epochs]
    right.plot(x, [e.get("train_loss") for e in epochs], marker="o", label="train")
    right.plot(x, [e.get("valid_loss") for e in epochs], marker="o", label="valid")
    _mark_unfreeze(right, epochs)
    losses = [v for e in epochs for v in (e.get("train_loss"), e.get("valid_loss")) if v]
    if losses and min(losses) > 0 and max(losses) / min(losses) > LOG_SCALE_RATIO:
        right.set_yscale("log")  # an early epoch of a model trained from scratch can be off the chart
    right.set(xlabel="epoch", ylabel="loss", title="per epoch")
    right.legend()
    fig.savefig(path)


def plot_per_tag(evaluation: Evaluation, path: Path) -> None:
    import numpy as np

    scores = sorted(evaluation.per_tag, key=lambda s: (s.f2, s.tag))
    fig = _figure(8.0, max(3.0, 1.2 + TAG_ROW_IN * len(scores)))
    ax = fig.subplots()
    y = np.arange(len(scores))
    h = 0.27
    ax.barh(y - h, [s.precision for s in scores], h, label="precision")
    ax.barh(y, [s.recall for s in scores], h, label="recall")
    ax.barh(y + h, [s.f2 for s in scores], h, label="F2")
    ax.set_yticks(y, [f"{s.tag} ({s.support})" for s in scores])
    ax.set(xlim=(0, 1), xlabel=f"score at threshold {evaluation.threshold:g}",
           title="Per tag on the holdout (support in brackets)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1.0
    fig.savefig(path)


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def render_html(summary: dict, evaluation: Evaluation, epochs: list[dict]) -> str:
    title = f"stilltag training report — {summary.get('arch', '')}"
    epoch_cols = [c for c in ("epoch", "phase", "train_loss", "valid_loss", "accuracy_multi", "f2", "seconds")
                  if any(c in e for e in epochs)]
    epoch_rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(e.get(c))}</td>" for c in epoch_cols) + "</tr>" for e in epochs
    )
    tag_rows = "".join(
        f"<tr><td>{html.escape(s.tag)}</td><td>{s.precision:.3f}</td><td>{s.recall:.3f}</td>"
        f"<td>{s.f2:.3f}</td><td>{s.support}</td></tr>"
        for s in sorted(evaluation.per_tag, key=lambda s: -s.support)
    )
    plots = "".join(f'<h2>{html.escape(t)}</h2><img src="{n}" alt="{html.escape(t)}">' for n, t in PLOTS.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Summary</h2>{_table(list(summary.items()))}
<h2>Epochs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in epoch_cols)}</tr>{epoch_rows}</table>
<h2>Holdout, per tag</h2><table><tr><th>tag</th><th>precision</th><th>recall</th><th>F2</th><th>support</th></tr>
{tag_rows}</table>
{plots}
</body></html>
"""


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value if value is not None else "-"))


def write_report(
    out_dir: Path, *, summary: dict, evaluation: Evaluation, epochs: list[dict], batch_losses: list[dict],
    lr_find: dict, lr: float,
) -> dict[str, Path]:
    """Write the plots, ``index.html`` and ``history.json`` to ``out_dir``.

    Returns:
        ``{store key under the version: local path}``, ready for ``registry.register(extra_files=...)``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_metrics(epochs, out_dir / "metrics.png")
    plot_lr_find(lr_find, lr, out_dir / "lr_find.png")
    plot_losses(batch_losses, epochs, out_dir / "losses.png")
    plot_per_tag(evaluation, out_dir / "per_tag.png")
    (out_dir / INDEX).write_text(render_html(summary, evaluation, epochs), encoding="utf-8")
    history = {"summary": summary, "epochs": epochs, "lr_find": lr_find, "batch_losses": batch_losses}
    (out_dir / "history.json").write_text(json.dumps(history, default=str, indent=1), encoding="utf-8")
    names = [*PLOTS, INDEX, "history.json"]
    return {f"{REPORT_DIR}/{name}": out_dir / name for name in names}
