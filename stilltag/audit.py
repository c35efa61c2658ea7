"""``stilltag audit``: the website's own tags checked by a model, so an admin can clean them.

It scores the tagged images (the holdout, chosen exactly as a retrain chooses it, or all of them)
with a registered model and lists

- *doubtful* tags: the website has them, the model puts them below ``low`` (0.05);
- *missing* tags: the website lacks them, the model puts them above ``high`` (0.9);

each ranked by the model's confidence, as a CSV, an HTML page with thumbnails, and a short table.

It lives at the command-line layer because it joins the two workers' code without copying
either: the training worker's dataset export and holdout rule (``training.dataset``) and the
tagging worker's sha256-checked loading, fetch + decode and batched forward pass (``worker``).
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared import registry
from shared.config import Settings
from shared.errors import UserError
from shared.runtime import Runtime

DEFAULT_LOW = 0.05  # a website tag the model puts below this is doubtful
DEFAULT_HIGH = 0.9  # a tag the website lacks that the model puts above this is missing
DEFAULT_LIMIT = 200  # entries per list in the CSV and the HTML page
THUMB_PX = 128  # the longer side of a thumbnail
CSV_NAME = "audit.csv"
HTML_NAME = "index.html"
THUMB_DIR = "thumbs"
CSV_COLUMNS = ("list", "rank", "image_id", "tag", "probability", "website_tags", "model_tags")

DOUBTFUL = "doubtful"  # the website has the tag, the model says no
MISSING = "missing"  # the website lacks the tag, the model says yes


class AuditError(UserError):
    """The audit cannot run; the message says what to do."""


@dataclass(frozen=True)
class Finding:
    list: str  # DOUBTFUL or MISSING
    image_id: int
    tag: str
    probability: float
    website_tags: tuple[str, ...]
    model_tags: tuple[str, ...]  # at or above the threshold, most probable first

    @property
    def confidence(self) -> float:
        """How sure the model is that the website is wrong here."""
        return 1.0 - self.probability if self.list == DOUBTFUL else self.probability


@dataclass
class Audit:
    version: str
    scope: str  # "holdout" or "all"
    images: int  # scored
    low: float
    high: float
    threshold: float
    doubtful: list[Finding] = field(default_factory=list)  # most confident first
    missing: list[Finding] = field(default_factory=list)
    unreadable: dict[int, str] = field(default_factory=dict)  # image_id -> why


def find(image_ids: list[int], website: list[tuple[str, ...]], probs: np.ndarray, vocab: list[str], *,
         low: float, high: float, threshold: float) -> tuple[list[Finding], list[Finding]]:
    """``(doubtful, missing)`` from the probabilities ``(images, tags)``, each most confident first.

    Website tags that the model does not know are not judged.
    """
    index = {t: i for i, t in enumerate(vocab)}
    doubtful: list[Finding] = []
    missing: list[Finding] = []
    for row, (image_id, tags) in enumerate(zip(image_ids, website, strict=True)):
        p = probs[row]
        model_tags = tuple(vocab[i] for i in np.argsort(-p, kind="stable") if p[i] >= threshold)
        have = set(tags)
        for tag in sorted(have & index.keys()):
            if p[index[tag]] < low:
                doubtful.append(Finding(DOUBTFUL, image_id, tag, float(p[index[tag]]), tuple(tags), model_tags))
        for i, tag in enumerate(vocab):
            if tag not in have and p[i] > high:
                missing.append(Finding(MISSING, image_id, tag, float(p[i]), tuple(tags), model_tags))
    doubtful.sort(key=lambda f: (f.probability, f.image_id, f.tag))
    missing.sort(key=lambda f: (-f.probability, f.image_id, f.tag))
    return doubtful, missing


def _model(rt: Runtime, version: str | None):
    """The version's learner (the champion by default), sha256-checked as a tagging worker loads it."""
    from worker.model import TaggingModel, resolve_device

    with rt.sessions() as session:
        record = (registry.get_version(session=session, version=version) if version
                  else registry.champion(session=session))
    if record is None:
        raise AuditError("there is no champion model to audit with; pass --version, or register one with "
                         "`stilltag models register PATH --promote`")
    path = registry.fetch_artifact(store=rt.model_store, record=record, cache_dir=rt.model_cache_dir)
    return TaggingModel.load(path, version=record.version, device=resolve_device(rt.settings.device))


def _examples(rt: Runtime, *, include_all: bool):
    """The website's tagged images through the training worker's export: its holdout, or every image."""
    from training.dataset import export_dataset

    with rt.sessions() as session:
        dataset = export_dataset(session=session, settings=rt.settings)
    if include_all:
        return sorted([*dataset.train, *dataset.valid, *dataset.holdout], key=lambda ex: ex.image_id)
    return dataset.holdout


def run_audit(settings: Settings, *, version: str | None = None, include_all: bool = False,
              low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH, progress=None) -> Audit:
    """Score the website's tagged images in batches of ``STILLTAG_MAX_BATCH`` and list the disagreements.

    Args:
        progress: called with ``(done, total)`` image counts after each batch.
    """
    from worker.service import Tagger

    if not 0.0 <= low < high <= 1.0:
        raise AuditError(f"the cut-offs must satisfy 0 <= low < high <= 1 (got low {low}, high {high})")
    rt = Runtime(settings)
    tagger = Tagger(settings, runtime=rt)  # its fetch + decode pool; closing it closes the runtime
    try:
        examples = _examples(rt, include_all=include_all)
        tagger.model = model = _model(rt, version)
        audit = Audit(model.version, "all" if include_all else "holdout", 0, low, high, settings.threshold)
        ids: list[int] = []
        website: list[tuple[str, ...]] = []
        chunks: list[np.ndarray] = []
        for start in range(0, len(examples), settings.max_batch):
            batch = examples[start:start + settings.max_batch]
            prepared = [f.result() for f in [tagger.submit(ex.image_id) for ex in batch]]
            ok = [(ex, p) for ex, p in zip(batch, prepared, strict=True) if p.pixels is not None]
            for p in prepared:
                if p.pixels is None:
                    audit.unreadable[p.image_id] = p.error or "not decoded"
            if ok:
                chunks.append(model.predict(np.stack([p.pixels for _, p in ok if p.pixels is not None])))
                ids += [ex.image_id for ex, _ in ok]
                website += [ex.tags for ex, _ in ok]
            if progress is not None:
                progress(min(start + len(batch), len(examples)), len(examples))
        audit.images = len(ids)
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(model.vocab)), dtype=np.float32)
        audit.doubtful, audit.missing = find(ids, website, probs, model.vocab, low=low, high=high,
                                             threshold=settings.threshold)
        return audit
    finally:
        tagger.close()


# --- output -----------------------------------------------------------------------------------
def _ranked(audit: Audit, limit: int | None) -> list[tuple[int, Finding]]:
    rows = []
    for findings in (audit.doubtful, audit.missing):
        rows += list(enumerate(findings[:limit] if limit else findings, start=1))
    return rows


def write_csv(path: Path, audit: Audit, *, limit: int | None = DEFAULT_LIMIT) -> Path:
    """One row per finding: list, rank, image_id, tag, probability, website_tags, model_tags (space-separated)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(CSV_COLUMNS)
        for rank, f in _ranked(audit, limit):
            out.writerow([f.list, rank, f.image_id, f.tag, f"{f.probability:.4f}", " ".join(f.website_tags),
                          " ".join(f.model_tags)])
    return path


def _thumbnail(images, image_id: int, folder: Path) -> str | None:
    """``thumbs/<id>.jpg`` (relative to the page), or None when the image cannot be read."""
    from PIL import Image, ImageOps

    name = f"{THUMB_DIR}/{image_id}.jpg"
    target = folder / name
    if target.is_file():
        return name
    try:
        with Image.open(io.BytesIO(images.fetch(image_id))) as img:
            img.draft("RGB", (THUMB_PX, THUMB_PX))
            thumb = ImageOps.exif_transpose(img).convert("RGB")
            thumb.thumbnail((THUMB_PX, THUMB_PX))
            target.parent.mkdir(parents=True, exist_ok=True)
            thumb.save(target, "JPEG", quality=85)
    except Exception:  # the CSV still lists it; the page shows no picture
        return None
    return name


def write_html(folder: Path, audit: Audit, images, *, limit: int | None = DEFAULT_LIMIT) -> Path:
    """``index.html`` with a thumbnail per finding (``thumbs/<id>.jpg`` beside it)."""
    e = html.escape
    sections = []
    titles = {DOUBTFUL: f"Website tags the model puts below {audit.low:g}",
              MISSING: f"Tags the website lacks that the model puts above {audit.high:g}"}
    for name, findings in ((DOUBTFUL, audit.doubtful), (MISSING, audit.missing)):
        shown = findings[:limit] if limit else findings
        rows = []
        for rank, f in enumerate(shown, start=1):
            thumb = _thumbnail(images, f.image_id, folder)
            img = f'<img src="{e(thumb)}" alt="image {f.image_id}">' if thumb else "(unreadable)"
            rows.append(f'<tr class="{name}"><td>{rank}</td><td>{img}</td><td>{f.image_id}</td>'
                        f"<td><b>{e(f.tag)}</b></td><td>{f.probability:.4f}</td>"
                        f"<td>{e(' '.join(f.website_tags))}</td><td>{e(' '.join(f.model_tags))}</td></tr>")
        more = f"<p>{len(findings) - len(shown)} more not shown (--limit).</p>" if len(findings) > len(shown) else ""
        sections.append(
            f'<h2 id="{name}">{e(titles[name])}: {len(findings)}</h2>{more}'
            f'<table id="{name}-table"><thead><tr><th>rank</th><th>image</th><th>image_id</th><th>tag</th>'
            f"<th>probability</th><th>website tags</th><th>model tags (&ge; {audit.threshold:g})</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    unreadable = "".join(f"<li>{i}: {e(why)}</li>" for i, why in sorted(audit.unreadable.items()))
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>stilltag audit: {e(audit.version)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-height:128px}</style></head><body>"
        f"<h1>Audit of the website's tags with model {e(audit.version)}</h1>"
        f"<p>{audit.images} {e(audit.scope)} images scored on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; each list is ranked by the model's confidence.</p>"
        f"{''.join(sections)}"
        + (f"<h2>Images that could not be read: {len(audit.unreadable)}</h2><ul>{unreadable}</ul>" if unreadable else "")
        + "</body></html>"
    )
    path = folder / HTML_NAME
    path.write_text(page, encoding="utf-8")
    return path


def print_summary(console, audit: Audit, *, rows: int = 10) -> None:
    """The top of each list as a rich table."""
    from rich.table import Table

    console.print(f"[bold]{audit.images}[/bold] {audit.scope} images scored with {audit.version}: "
                  f"{len(audit.doubtful)} doubtful website tags (< {audit.low:g}), "
                  f"{len(audit.missing)} missing tags (> {audit.high:g})"
                  + (f", {len(audit.unreadable)} images unreadable" if audit.unreadable else ""))
    for title, findings in ((f"website tags the model puts below {audit.low:g}", audit.doubtful),
                            (f"tags the website lacks, model above {audit.high:g}", audit.missing)):
        if not findings:
            continue
        table = Table(title=title)
        for column in ("#", "image", "tag", "p", "website tags"):
            table.add_column(column, justify="right" if column in ("#", "image", "p") else "left")
        for rank, f in enumerate(findings[:rows], start=1):
            table.add_row(str(rank), str(f.image_id), f.tag, f"{f.probability:.3f}", " ".join(f.website_tags))
        console.print(table)
