"""Database schema, engines and sessions.

The tables are created by migrations (``stilltag db upgrade``), never by ``create_all``; the
metadata here is what the migrations are checked against: alembic's ``compare_metadata``
between the migrated schema and this metadata must find nothing, on PostgreSQL and SQLite
(tests/integration/test_persist.py). The same code runs on both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

metadata = sa.MetaData()

tag_suggestions = sa.Table(
    "tag_suggestions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("tag", sa.String(255), nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("image_id", "model_version", "tag", name="uq_tag_suggestions_image_version_tag"),
    sa.Index("ix_tag_suggestions_image_id", "image_id"),  # the website reads an image's suggestions
)

tagging_status = sa.Table(
    "tagging_status",
    metadata,
    sa.Column("image_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("model_version", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("arch", sa.String(64), nullable=False),
    sa.Column("vocab", sa.JSON, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("dataset_size", sa.Integer, nullable=True),
    sa.Column("snapshot_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
)

# One row per retrain, for the website's admin page (training/runs.py writes it). ``id`` is the
# Celery task id of ``stilltag.retrain`` (what the enqueue returns), or a fresh uuid for ``train --now``.
retrain_runs = sa.Table(
    "retrain_runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # queued, running, succeeded, failed, skipped
    sa.Column("stage", sa.String(32), nullable=True),  # while running: dataset, lr_find, frozen, unfrozen, ...
    sa.Column("epoch", sa.Integer, nullable=True),  # while training: the epoch in the stage, from 1
    sa.Column("n_epochs", sa.Integer, nullable=True),  # ... of this many
    sa.Column("options", sa.JSON, nullable=True),  # the train_* options the request gave
    sa.Column("worker", sa.String(255), nullable=True),  # "host pid N" of the process that runs it
    sa.Column("version", sa.String(64), nullable=True),  # the model version it registered
    sa.Column("reason", sa.Text, nullable=True),  # the gate's reason; why it failed or was skipped
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("ix_retrain_runs_created_at", "created_at"),  # the admin page lists the newest runs
)

# The website's own tags, in the demo schema. A real website keeps its tags in its own tables;
# STILLTAG_DATASET_QUERY points the training worker at them instead.
image_tags = sa.Table(
    "image_tags",
    metadata,
    sa.Column("image_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("tag", sa.String(255), primary_key=True),
)

SQLITE_BUSY_TIMEOUT_MS = 30_000  # several worker processes share one SQLite file in the demo


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so processes can share it."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session
