"""The training set: the website's own tags, exported by a configurable SQL query.

``STILLTAG_DATASET_QUERY`` returns either ``(image_id, tag)`` rows, one per tag, or
``(image_id, tags)`` rows with the tags space-separated; the second column's name (``tag`` or
``tags``) says which. A third column, ``group_id`` (for stills, the movie), is optional: images
of one group then fall on the same side of every split. The query runs through SQLAlchemy ``text()`` with bound parameters only
(``:snapshot_at`` and ``:min_tag_images`` are offered to it), never string formatting.

Which images are held out is a pure function of ``(holdout_seed, image_id)``: every model is
judged on the same images, and images added later join the holdout or the training set by the
same rule, never by shuffling. With a ``group_id`` the hash is of the group instead, so no group
straddles train and holdout (one movie's stills look alike: a random split would leak).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import UserError
from shared.learner_parts import Example  # pickled with exported learners, so it lives in shared

HASH_BUCKETS = 10_000  # the hash rule splits at 0.01 % granularity
FETCH_ROWS = 10_000  # rows streamed from the database at a time
VALID_SALT = "valid"  # the validation slice uses its own hash, independent of the holdout's

ONE_TAG_COLUMN = "tag"
MANY_TAGS_COLUMN = "tags"
GROUP_COLUMN = "group_id"


class DatasetError(UserError):
    """The query or its rows cannot make a training set; the message says what to change."""


@dataclass
class Dataset:
    """What a retrain learns from and is judged on."""

    train: list[Example]  # fitted on
    valid: list[Example]  # picks the best epoch and stops early
    holdout: list[Example]  # judges the model (the gate); never seen while training
    vocab: list[str]
    snapshot_at: dt.datetime
    dropped_tags: dict[str, int] = field(default_factory=dict)  # tag -> images that had it
    dropped_images: int = 0  # images left with no tag once rare tags were dropped
    groups: int = 0  # distinct group_id values the query returned (0: split by image)

    @property
    def size(self) -> int:
        return len(self.train) + len(self.valid) + len(self.holdout)


def hash_bucket(seed: str, image_id: int, salt: str = "", *, group: str | None = None) -> int:
    """A stable number in ``[0, HASH_BUCKETS)`` for an image (or its group, when it has one): same
    inputs, same bucket, on any machine."""
    key = f"group:{group}" if group is not None else str(int(image_id))
    digest = hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HASH_BUCKETS


def in_holdout(image_id: int, *, seed: str, pct: float, group: str | None = None) -> bool:
    return hash_bucket(seed, image_id, group=group) < pct * HASH_BUCKETS / 100


def in_valid(image_id: int, *, seed: str, pct: float, group: str | None = None) -> bool:
    """The validation slice of the non-holdout images (same share, an independent hash)."""
    return hash_bucket(seed, image_id, VALID_SALT, group=group) < pct * HASH_BUCKETS / 100


def query_params(query: str, available: dict[str, object]) -> dict[str, object]:
    """The offered parameters that the query names (``:name``), to bind and nothing else."""
    return {k: v for k, v in available.items() if re.search(rf"(?<![:\w]):{k}\b", query)}


def read_rows(
    *, session: Session, query: str, params: dict[str, object] | None = None, groups: dict[int, str] | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """``(image_id, [tags])`` for every row the query returns.

    Args:
        groups: when the query has a ``group_id`` column, each image's group is put here
            (as text; an image with a NULL group is left out and split by its own ID).

    Raises:
        DatasetError: the query does not return the expected columns.
    """
    result = session.execute(sa.text(query).execution_options(stream_results=True, yield_per=FETCH_ROWS), params or {})
    columns = [c.lower() for c in result.keys()]  # noqa: SIM118 (a Result: iterating it gives rows)
    if (len(columns) not in (2, 3) or columns[1] not in (ONE_TAG_COLUMN, MANY_TAGS_COLUMN)
            or (len(columns) == 3 and columns[2] != GROUP_COLUMN)):
        result.close()
        raise DatasetError(
            f"STILLTAG_DATASET_QUERY returns columns {list(result.keys())}; it must return image_id and either "
            f"`{ONE_TAG_COLUMN}` (one row per tag) or `{MANY_TAGS_COLUMN}` (space-separated), optionally then "
            f"`{GROUP_COLUMN}`, e.g. SELECT image_id, tag FROM image_tags"
        )
    many = columns[1] == MANY_TAGS_COLUMN
    for image_id, value, *group in result:
        if image_id is None or value is None:
            continue
        if groups is not None and group and group[0] is not None:
            groups[int(image_id)] = str(group[0])
        value = str(value).strip()
        tags = value.split() if many else [value]
        yield int(image_id), [t for t in tags if t]


def collect(rows: Iterable[tuple[int, list[str]]]) -> dict[int, set[str]]:
    """Rows → each image's set of tags (rows for one image may come in any order)."""
    labels: dict[int, set[str]] = {}
    for image_id, tags in rows:
        labels.setdefault(image_id, set()).update(tags)
    return labels


def drop_rare_tags(
    labels: dict[int, set[str]], *, min_images: int
) -> tuple[dict[int, tuple[str, ...]], list[str], dict[str, int], int]:
    """Leave out tags on fewer than ``min_images`` images, then images left with no tag.

    Returns:
        ``(labels, vocab, dropped_tags, dropped_images)``: sorted tag tuples per image, the
        sorted vocabulary, each dropped tag with its image count, and how many images fell out.
    """
    counts = Counter(t for tags in labels.values() for t in tags)
    vocab = sorted(t for t, n in counts.items() if n >= min_images)
    keep = set(vocab)
    dropped = {t: n for t, n in sorted(counts.items()) if t not in keep}
    kept: dict[int, tuple[str, ...]] = {}
    for image_id, tags in labels.items():
        remaining = tuple(sorted(tags & keep))
        if remaining:  # F2 averaged over samples is undefined for an image with no tag
            kept[image_id] = remaining
    return kept, vocab, dropped, len(labels) - len(kept)


def split(
    labels: dict[int, tuple[str, ...]], *, seed: str, pct: float, groups: dict[int, str] | None = None,
) -> tuple[list[Example], list[Example], list[Example]]:
    """``(train, valid, holdout)`` by the hash rule, each in image-ID order.

    With ``groups`` (image ID → group), an image in a group is placed by its group's hash, so a
    whole group lands in one part; images without a group are placed by their own ID.
    """
    groups = groups or {}
    train: list[Example] = []
    valid: list[Example] = []
    holdout: list[Example] = []
    for image_id in sorted(labels):
        ex = Example(image_id, labels[image_id])
        group = groups.get(image_id)
        if in_holdout(image_id, seed=seed, pct=pct, group=group):
            holdout.append(ex)
        elif in_valid(image_id, seed=seed, pct=pct, group=group):
            valid.append(ex)
        else:
            train.append(ex)
    return train, valid, holdout


def export_dataset(*, session: Session, settings: Settings, now: dt.datetime | None = None) -> Dataset:
    """Run the dataset query and build the split.

    Raises:
        DatasetError: too little data to train on or to judge the model.
    """
    snapshot_at = now or dt.datetime.now(dt.UTC)
    offered = {"snapshot_at": snapshot_at, "min_tag_images": settings.train_min_tag_images}
    query = settings.dataset_query
    groups: dict[int, str] = {}
    labels = collect(read_rows(session=session, query=query, params=query_params(query, offered), groups=groups))
    kept, vocab, dropped, dropped_images = drop_rare_tags(labels, min_images=settings.train_min_tag_images)
    train, valid, holdout = split(kept, seed=settings.holdout_seed, pct=settings.holdout_pct, groups=groups)
    if not vocab:
        raise DatasetError(
            f"no tag is used by at least {settings.train_min_tag_images} images ({len(labels)} images "
            "returned by STILLTAG_DATASET_QUERY); tag more images or lower STILLTAG_TRAIN_MIN_TAG_IMAGES"
        )
    for name, part in (("training", train), ("validation", valid), ("holdout", holdout)):
        if not part:
            raise DatasetError(
                f"the {name} set is empty ({len(kept)} usable images); tag more images "
                "or raise STILLTAG_HOLDOUT_PCT"
            )
    return Dataset(
        train=train, valid=valid, holdout=holdout, vocab=vocab, snapshot_at=snapshot_at,
        dropped_tags=dropped, dropped_images=dropped_images, groups=len(set(groups.values())),
    )
