"""The audit's lists and files, from probabilities a test chooses (the real learner: tests/integration/test_audit.py)."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from stilltag.audit import DOUBTFUL, MISSING, Audit, find, write_csv, write_html

VOCAB = ["blue", "circle", "dots", "red"]


def test_find_lists_doubtful_and_missing_tags_most_confident_first():
    probs = np.array([
        [0.01, 0.95, 0.50, 0.04],  # image 1: has blue (0.01) and red (0.04), lacks circle (0.95)
        [0.99, 0.20, 0.93, 0.90],  # image 2: lacks blue (0.99) and dots (0.93); red 0.90 is not above 0.9
        [0.05, 0.97, 0.00, 0.60],  # image 3: blue at 0.05 is not below 0.05; circle is on the website
    ], dtype=np.float32)
    website = [("blue", "red", "unknown-tag"), ("circle",), ("blue", "circle")]
    doubtful, missing = find([1, 2, 3], website, probs, VOCAB, low=0.05, high=0.9, threshold=0.2)
    assert [(f.image_id, f.tag) for f in doubtful] == [(1, "blue"), (1, "red")]
    assert [(f.image_id, f.tag) for f in missing] == [(2, "blue"), (1, "circle"), (2, "dots")]
    assert {f.list for f in doubtful} == {DOUBTFUL} and {f.list for f in missing} == {MISSING}
    assert doubtful[0].confidence > doubtful[1].confidence and missing[0].confidence > missing[-1].confidence
    assert missing[0].model_tags == ("blue", "dots", "red", "circle")  # at or above 0.2, most probable first
    assert missing[0].website_tags == ("circle",)


class _Tables(HTMLParser):
    """Rows of each <table id=...>, and every <img src>."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self._table.append(self._row)
            self._row = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


class _Images:
    def fetch(self, image_id: int) -> bytes:
        if image_id == 2:
            raise FileNotFoundError("gone")
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (200, 30, 30)).save(buf, "JPEG")
        return buf.getvalue()


def parse_html(path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_csv_and_html_hold_the_ranked_lists_with_thumbnails(tmp_path):
    probs = np.array([[0.01, 0.95, 0.5, 0.04], [0.99, 0.2, 0.93, 0.9]], dtype=np.float32)
    doubtful, missing = find([1, 2], [("blue", "red"), ("circle",)], probs, VOCAB, low=0.05, high=0.9, threshold=0.2)
    audit = Audit("v7", "holdout", 2, 0.05, 0.9, 0.2, doubtful, missing, unreadable={9: "not an image"})

    with write_csv(tmp_path / "audit.csv", audit, limit=2).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["list"], r["rank"], r["image_id"], r["tag"], r["probability"]) for r in rows] == [
        ("doubtful", "1", "1", "blue", "0.0100"), ("doubtful", "2", "1", "red", "0.0400"),
        ("missing", "1", "2", "blue", "0.9900"), ("missing", "2", "1", "circle", "0.9500"),
    ]  # --limit 2: the third missing tag (dots on image 2) is left out
    assert rows[2]["website_tags"] == "circle" and rows[2]["model_tags"] == "blue dots red circle"

    page = parse_html(write_html(tmp_path, audit, _Images(), limit=None))
    doubtful_rows = page.tables["doubtful-table"][1:]
    missing_rows = page.tables["missing-table"][1:]
    assert [(r[2], r[3], r[4]) for r in doubtful_rows] == [("1", "blue", "0.0100"), ("1", "red", "0.0400")]
    assert [(r[2], r[3]) for r in missing_rows] == [("2", "blue"), ("1", "circle"), ("2", "dots")]
    assert "(unreadable)" in missing_rows[0][1]  # image 2 cannot be fetched: no picture, still listed
    assert set(page.images) == {"thumbs/1.jpg"}
    with Image.open(tmp_path / "thumbs" / "1.jpg") as thumb:
        assert max(thumb.size) <= 128 and thumb.format == "JPEG"
    assert "9: not an image" in (tmp_path / "index.html").read_text()
