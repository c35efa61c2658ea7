"""A report per training run: PNG plots and one HTML page, stored with the model version.

Plots use matplotlib's object API (``Figure`` renders with Agg), so no GUI backend or global
pyplot state is touched; matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.evaluate import Evaluation, cutoffs

if TYPE_CHECKING:
    import numpy as np

    from training.dataset import Example
    from training.thresholds import Thresholds

REPORT_DIR = "report"  # files are stored as {version}/report/<name>
INDEX = "index.html"
PLOTS = {
    "metrics.png": "Metrics per epoch (validation set)",
    "lr_find.png": "lr_find: loss against learning rate",
    "losses.png": "Loss curves",
    "per_tag.png": "Per-tag precision, recall and F2 on the holdout",
}
PR_CURVES = ("pr_curves.png", "Precision/recall per tag on the holdout (the most frequent tags)")
PR_CURVE_TAGS = 24  # the most frequent tags get a panel each; more would make an unreadable picture
PR_COLUMNS = 4
UNCERTAIN_DIR = "uncertain"  # thumbnails of the least sure holdout images
UNCERTAIN_IMAGES = 12
THUMBNAIL_PX = 128
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


def plot_pr_curves(probs: np.ndarray, truth: np.ndarray, vocab: list[str], *, threshold: float,
                   per_tag: dict[str, float], path: Path) -> list[str]:
    """A precision/recall panel per tag (the ``PR_CURVE_TAGS`` most frequent), with the tag's
    chosen threshold and the global one marked. Returns the tags drawn."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    support = truth.sum(axis=0)
    order = [j for j in np.argsort(-support, kind="stable") if support[j] > 0][:PR_CURVE_TAGS]
    rows = max(1, -(-len(order) // PR_COLUMNS))
    fig = _figure(2.6 * PR_COLUMNS, 2.4 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, PR_COLUMNS, squeeze=False)).ravel()
    for ax, j in zip(axes, order, strict=False):
        precision, recall, _ = precision_recall_curve(truth[:, j], probs[:, j])
        ax.plot(recall, precision, color="tab:blue", linewidth=1)
        for cut, style, label in ((per_tag.get(vocab[j], threshold), "o", "chosen"), (threshold, "x", "global")):
            pred = probs[:, j] >= cut
            tp = float((pred & truth[:, j]).sum())
            p = tp / pred.sum() if pred.sum() else 1.0
            r = tp / truth[:, j].sum()
            ax.plot([r], [p], style, color="red" if label == "chosen" else "black", markersize=7,
                    label=f"{label} {cut:.2f}")
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), title=f"{vocab[j]} ({int(support[j])})")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[len(order):]:
        ax.set_visible(False)
    fig.suptitle("Holdout precision (y) against recall (x) per tag, support in brackets\n"
                 "red dot: the tag's own threshold; black x: the global threshold")
    fig.savefig(path)
    return [vocab[j] for j in order]


def least_sure(probs: np.ndarray, vocab: list[str], holdout: list[Example], *, cut: np.ndarray,
               n: int = UNCERTAIN_IMAGES) -> list[dict]:
    """The ``n`` holdout images with a probability nearest its tag's threshold (nearest first)."""
    import numpy as np

    if len(holdout) == 0:
        return []
    distance = np.abs(probs - cut)
    nearest = distance.argmin(axis=1)
    rows = []
    for i in np.argsort(distance[np.arange(len(holdout)), nearest], kind="stable")[:n]:
        j = int(nearest[i])
        rows.append({
            "image_id": holdout[i].image_id, "true": list(holdout[i].tags),
            "suggested": [(vocab[k], float(probs[i, k])) for k in np.argsort(-probs[i]) if probs[i, k] >= cut[k]],
            "unsure_tag": vocab[j], "unsure_prob": float(probs[i, j]), "unsure_cut": float(cut[j]),
        })
    return rows


def write_thumbnails(rows: list[dict], holdout: list[Example], read: Callable[[Any], Any], out_dir: Path) -> None:
    by_id = {ex.image_id: ex for ex in holdout}
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        picture = read(by_id[row["image_id"]]).convert("RGB")
        picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        picture.save(out_dir / f"{row['image_id']}.jpg", quality=85)


def _uncertain_html(rows: list[dict], mode: str) -> str:
    body = "".join(
        f"<tr><td>{r['image_id']}</td><td><img src=\"{UNCERTAIN_DIR}/{r['image_id']}.jpg\" "
        f"alt=\"image {r['image_id']}\" width=\"{THUMBNAIL_PX}\"></td>"
        f"<td>{html.escape(' '.join(r['true']))}</td>"
        f"<td>{html.escape(', '.join(f'{t} {p:.2f}' for t, p in r['suggested'])) or '-'}</td>"
        f"<td>{html.escape(r['unsure_tag'])} {r['unsure_prob']:.3f} (threshold {r['unsure_cut']:.3f})</td></tr>"
        for r in rows
    )
    return (f"<h2>Least sure holdout images</h2><p>The holdout images with a probability nearest its tag's "
            f"threshold ({html.escape(mode)} thresholds, as served).</p>"
            f"<table id=\"uncertain\"><tr><th>image</th><th>thumbnail</th><th>true tags</th><th>suggested</th>"
            f"<th>nearest the threshold</th></tr>{body}</table>")


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def render_html(summary: dict, evaluation: Evaluation, epochs: list[dict], *,
                per_tag_evaluation: Evaluation | None = None, thresholds: Thresholds | None = None,
                uncertain: str = "", pr_tags: list[str] | None = None) -> str:
    title = f"stilltag training report — {summary.get('arch', '')}"
    epoch_cols = [c for c in ("epoch", "phase", "train_loss", "valid_loss", "accuracy_multi", "f2", "seconds")
                  if any(c in e for e in epochs)]
    epoch_rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(e.get(c))}</td>" for c in epoch_cols) + "</tr>" for e in epochs
    )
    own = {s.tag: s for s in per_tag_evaluation.per_tag} if per_tag_evaluation else {}
    chosen = {t.tag: t for t in thresholds.per_tag} if thresholds else {}
    tag_rows = "".join(
        f"<tr><td>{html.escape(s.tag)}</td><td>{s.precision:.3f}</td><td>{s.recall:.3f}</td>"
        f"<td>{s.f2:.3f}</td><td>{s.support}</td>"
        + (f"<td>{chosen[s.tag].threshold:.3f}{' (global: few positives)' if chosen[s.tag].fallback else ''}</td>"
           f"<td>{own[s.tag].precision:.3f}</td><td>{own[s.tag].recall:.3f}</td><td>{own[s.tag].f2:.3f}</td>"
           if s.tag in own and s.tag in chosen else "")
        + "</tr>"
        for s in sorted(evaluation.per_tag, key=lambda s: -s.support)
    )
    per_tag_head = ("<th>own threshold</th><th>precision</th><th>recall</th><th>F2</th>" if own and chosen else "")
    both = ""
    if per_tag_evaluation is not None:
        both = (f"<h2>Holdout F2, global and per-tag thresholds</h2><table id=\"f2-both\"><tr><th></th>"
                f"<th>global threshold {evaluation.threshold:g}</th><th>per-tag thresholds (chosen on validation)</th>"
                f"</tr><tr><th>F2</th><td>{evaluation.f2:.4f}</td><td>{per_tag_evaluation.f2:.4f}</td></tr>"
                f"<tr><th>precision</th><td>{evaluation.precision:.4f}</td><td>{per_tag_evaluation.precision:.4f}</td></tr>"
                f"<tr><th>recall</th><td>{evaluation.recall:.4f}</td><td>{per_tag_evaluation.recall:.4f}</td></tr>"
                f"<tr><th>images</th><td>{evaluation.n_images}</td><td>{per_tag_evaluation.n_images}</td></tr></table>")
    plots = "".join(f'<h2>{html.escape(t)}</h2><img src="{n}" alt="{html.escape(t)}">' for n, t in PLOTS.items())
    if pr_tags is not None:
        plots += (f'<h2>{html.escape(PR_CURVES[1])}</h2><p>{len(pr_tags)} tags.</p>'
                  f'<img src="{PR_CURVES[0]}" alt="{html.escape(PR_CURVES[1])}">')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Summary</h2>{_table(list(summary.items()))}
{both}
<h2>Epochs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in epoch_cols)}</tr>{epoch_rows}</table>
<h2>Holdout, per tag</h2><p>At the global threshold, then at the tag's own threshold.</p>
<table id="per-tag"><tr><th>tag</th><th>precision</th><th>recall</th><th>F2</th><th>support</th>{per_tag_head}</tr>
{tag_rows}</table>
{uncertain}
{plots}
</body></html>
"""


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value if value is not None else "-"))


def write_report(
    out_dir: Path, *, summary: dict, evaluation: Evaluation, epochs: list[dict], batch_losses: list[dict],
    lr_find: dict, lr: float, per_tag_evaluation: Evaluation | None = None, thresholds: Thresholds | None = None,
    holdout_probs: np.ndarray | None = None, holdout: list[Example] | None = None,
    read: Callable[[Any], Any] | None = None, mode: str = "global",
) -> dict[str, Path]:
    """Write the plots, ``index.html`` and ``history.json`` to ``out_dir``.

    With the holdout's probabilities, its examples, a picture reader and the thresholds, the
    report also has precision/recall curves per tag and the least sure holdout images.

    Returns:
        ``{store key under the version: local path}``, ready for ``registry.register(extra_files=...)``.
    """
    from training.evaluate import targets

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_metrics(epochs, out_dir / "metrics.png")
    plot_lr_find(lr_find, lr, out_dir / "lr_find.png")
    plot_losses(batch_losses, epochs, out_dir / "losses.png")
    plot_per_tag(evaluation, out_dir / "per_tag.png")
    names = [*PLOTS, INDEX, "history.json"]
    uncertain, pr_tags = "", None
    if holdout_probs is not None and holdout is not None and thresholds is not None:
        vocab = [s.tag for s in evaluation.per_tag]
        own = thresholds.as_dict()
        pr_tags = plot_pr_curves(holdout_probs, targets(holdout, vocab).astype(bool), vocab,
                                 threshold=evaluation.threshold, per_tag=own, path=out_dir / PR_CURVES[0])
        names.append(PR_CURVES[0])
        cut = cutoffs(vocab, threshold=evaluation.threshold, per_tag=own if mode == "per_tag" else None)
        rows = least_sure(holdout_probs, vocab, holdout, cut=cut)
        if read is not None:
            write_thumbnails(rows, holdout, read, out_dir / UNCERTAIN_DIR)
            names += [f"{UNCERTAIN_DIR}/{r['image_id']}.jpg" for r in rows]
            uncertain = _uncertain_html(rows, mode)
    page = render_html(summary, evaluation, epochs, per_tag_evaluation=per_tag_evaluation, thresholds=thresholds,
                       uncertain=uncertain, pr_tags=pr_tags)
    (out_dir / INDEX).write_text(page, encoding="utf-8")
    history = {"summary": summary, "epochs": epochs, "lr_find": lr_find, "batch_losses": batch_losses}
    (out_dir / "history.json").write_text(json.dumps(history, default=str, indent=1), encoding="utf-8")
    return {f"{REPORT_DIR}/{name}": out_dir / name for name in names}
