"""Persist: one transaction per batch for tag suggestions and statuses, then the events.

Writes are idempotent: tagging an image again with the same model replaces its rows, so a
redelivered message leaves exactly the rows a single delivery would.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.constants import STATE_FAILED, STATE_TAGGED, TAGGED_CHANNEL
from shared.db import tag_suggestions, tagging_status

log = logging.getLogger(__name__)

ERROR_MAX_CHARS = 2_000  # tagging_status.error keeps the start of very long messages


@dataclass(frozen=True)
class ImageResult:
    image_id: int
    state: str
    tags: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def select_tags(
    probs: np.ndarray, vocab: list[str], *, threshold: float | np.ndarray, top_k: int
) -> list[tuple[str, float]]:
    """Tags with probability ≥ threshold (one for all tags, or one per tag), most probable first,
    at most ``top_k``: the cap applies to the tags that pass, so a probable tag below its own
    threshold does not push out a less probable one above its own."""
    cut = np.broadcast_to(np.asarray(threshold, dtype=float), probs.shape)
    order = np.argsort(-probs, kind="stable")
    return [(vocab[i], float(probs[i])) for i in order if probs[i] >= cut[i]][:top_k]


def _upsert(session: Session):
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def persist_batch(*, session: Session, model_version: str, results: list[ImageResult]) -> None:
    """Write a batch's suggestions and statuses in the caller's transaction."""
    if not results:
        return
    now = dt.datetime.now(dt.UTC)
    ids = [r.image_id for r in results]
    session.execute(
        sa.delete(tag_suggestions).where(
            tag_suggestions.c.image_id.in_(ids), tag_suggestions.c.model_version == model_version
        )
    )
    rows = [
        {"image_id": r.image_id, "tag": tag, "probability": p, "model_version": model_version, "created_at": now}
        for r in results
        for tag, p in r.tags
    ]
    if rows:
        session.execute(sa.insert(tag_suggestions), rows)
    insert = _upsert(session)
    stmt = insert(tagging_status).values(
        [
            {
                "image_id": r.image_id,
                "state": r.state,
                "error": r.error[:ERROR_MAX_CHARS] if r.error else None,
                "model_version": model_version,
                "created_at": now,
                "updated_at": now,
            }
            for r in results
        ]
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[tagging_status.c.image_id],
            set_={
                "state": stmt.excluded.state,
                "error": stmt.excluded.error,
                "model_version": stmt.excluded.model_version,
                "updated_at": stmt.excluded.updated_at,
            },
        )
    )


def publish_events(client, *, model_version: str, results: list[ImageResult]) -> None:
    """Tell the website, after commit, which images changed (best effort: the rows are the truth)."""
    if client is None or not results:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for r in results:
            pipe.publish(
                TAGGED_CHANNEL, json.dumps({"image_id": r.image_id, "state": r.state, "model_version": model_version})
            )
        pipe.execute()
    except Exception:
        log.exception("could not publish %d tagging events on %s", len(results), TAGGED_CHANNEL)


def tagged(image_id: int, tags: list[tuple[str, float]]) -> ImageResult:
    return ImageResult(image_id=image_id, state=STATE_TAGGED, tags=tags)


def failed(image_id: int, error: str) -> ImageResult:
    return ImageResult(image_id=image_id, state=STATE_FAILED, error=error)
