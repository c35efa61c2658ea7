"""Schema by migrations and idempotent batch writes, on PostgreSQL and SQLite."""

import numpy as np
import pytest
import sqlalchemy as sa

from shared.db import make_engine, session_factory, tag_suggestions, tagging_status, transaction
from shared.migrate import downgrade, upgrade
from worker.results import failed, persist_batch, select_tags, tagged

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'stilltag.db'}"


@pytest.fixture
def sessions(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def _rows(sessions):
    with sessions() as s:
        sugg = s.execute(
            sa.select(tag_suggestions.c.image_id, tag_suggestions.c.tag, tag_suggestions.c.probability,
                      tag_suggestions.c.model_version).order_by(tag_suggestions.c.image_id, tag_suggestions.c.tag)
        ).all()
        status = s.execute(
            sa.select(tagging_status.c.image_id, tagging_status.c.state, tagging_status.c.error,
                      tagging_status.c.model_version).order_by(tagging_status.c.image_id)
        ).all()
    return sugg, status


def test_migrations_create_every_table_and_go_back(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    names = set(sa.inspect(engine).get_table_names())
    assert {"tag_suggestions", "tagging_status", "model_versions", "image_tags", "retrain_runs",
            "alembic_version"} <= names
    upgrade(db_url)  # running it again is a no-op
    downgrade(db_url, "0001")
    assert "retrain_runs" not in set(sa.inspect(engine).get_table_names())
    assert "tag_suggestions" in set(sa.inspect(engine).get_table_names())
    downgrade(db_url, "base")
    assert "tag_suggestions" not in set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_a_batch_is_written_and_a_duplicate_changes_nothing(sessions):
    batch = [tagged(1, [("red", 0.9), ("circle", 0.4)]), tagged(2, []), failed(3, "empty file (0 bytes)")]
    with transaction(sessions) as s:
        persist_batch(session=s, model_version="v1", results=batch)
    first = _rows(sessions)
    with transaction(sessions) as s:
        persist_batch(session=s, model_version="v1", results=batch)
    assert _rows(sessions) == first
    sugg, status = first
    assert sugg == [(1, "circle", 0.4, "v1"), (1, "red", 0.9, "v1")]
    assert status == [(1, "tagged", None, "v1"), (2, "tagged", None, "v1"), (3, "failed", "empty file (0 bytes)", "v1")]


def test_retagging_with_the_same_model_replaces_rows(sessions):
    with transaction(sessions) as s:
        persist_batch(session=s, model_version="v1", results=[tagged(1, [("red", 0.9), ("blue", 0.3)])])
    with transaction(sessions) as s:
        persist_batch(session=s, model_version="v1", results=[tagged(1, [("red", 0.8)])])
    sugg, _ = _rows(sessions)
    assert sugg == [(1, "red", 0.8, "v1")]


def test_a_failed_transaction_writes_nothing(sessions):
    with pytest.raises(RuntimeError), transaction(sessions) as s:
        persist_batch(session=s, model_version="v1", results=[tagged(1, [("red", 0.9)])])
        raise RuntimeError("commit never happens")
    assert _rows(sessions) == ([], [])


def test_select_tags_threshold_and_top_k():
    vocab = ["a", "b", "c", "d"]
    probs = np.array([0.1, 0.9, 0.2, 0.5], dtype=np.float32)
    assert [t for t, _ in select_tags(probs, vocab, threshold=0.2, top_k=10)] == ["b", "d", "c"]
    assert [t for t, _ in select_tags(probs, vocab, threshold=0.2, top_k=2)] == ["b", "d"]
    assert select_tags(probs, vocab, threshold=0.95, top_k=10) == []


def test_the_migrations_build_the_schema_the_metadata_describes(db_url):
    # shared/db.py's metadata is what the code queries; the migrations are what production runs.
    # alembic's autogenerate compare finds any table, column, type, index or constraint in one only.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from shared.db import metadata

    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            drift = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert drift == [], f"shared/db.py and shared/migrations disagree: {drift}"


def test_upgrade_makes_the_folder_of_any_sqlite_url(tmp_path):
    path = tmp_path / "new" / "folder" / "stilltag.db"
    upgrade(f"sqlite+pysqlite:///{path}")
    assert "tagging_status" in sa.inspect(sa.create_engine(f"sqlite:///{path}")).get_table_names()


def test_db_upgrade_names_the_database_without_its_password(pg_url, monkeypatch):
    from sqlalchemy.engine import make_url
    from typer.testing import CliRunner

    from shared.config import get_settings
    from stilltag.cli import app

    url = make_url(pg_url).set(password="s3cret")  # trust auth: the server ignores it
    monkeypatch.setenv("STILLTAG_DATABASE_URL", url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["db", "upgrade"], catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "s3cret" not in out
    assert f"postgresql+psycopg://{url.username}:***@{url.host}:{url.port}/{url.database}" in out
