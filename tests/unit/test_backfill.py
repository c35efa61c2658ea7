"""Backfill selection, skipping and progress lines (on a SQLite file: no server needed)."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
import sqlalchemy as sa

from shared.backfill import (
    START,
    BackfillError,
    Counts,
    IdSelection,
    PlainProgress,
    QuerySelection,
    already_done,
    cursor_key,
    parse_ids,
    progress_line,
)
from shared.backfill_cli import choose_selection
from shared.config import Settings
from shared.db import make_engine, session_factory, tagging_status
from shared.errors import translate
from shared.migrate import upgrade


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'site.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE stills (id INTEGER PRIMARY KEY, hidden INTEGER NOT NULL DEFAULT 0)"))
        c.execute(sa.text("INSERT INTO stills (id, hidden) VALUES (5, 0), (1, 0), (9, 1), (3, 0), (7, 0)"))
    yield session_factory(engine)
    engine.dispose()


def set_status(sessions, rows: list[tuple[int, str, str]]) -> None:
    now = dt.datetime.now(dt.UTC)
    with sessions.begin() as s:
        s.execute(sa.insert(tagging_status), [
            {"image_id": i, "state": state, "model_version": version, "created_at": now, "updated_at": now}
            for i, state, version in rows
        ])


def test_parse_ids_reads_lines_spaces_commas_and_comments():
    text = "3\n1, 2 # the first ones\n\n# nothing here\n10 11\n"
    assert list(parse_ids(io.StringIO(text))) == [3, 1, 2, 10, 11]


def test_parse_ids_names_the_line_of_a_bad_token():
    with pytest.raises(BackfillError, match=r"ids.txt, line 2: 'x7' is not an image ID"):
        list(parse_ids(io.StringIO("1\n2 x7\n"), source="ids.txt"))


def test_id_selection_is_distinct_ascending_and_pages_after_a_cursor():
    selection = IdSelection([9, 3, 3, 1, 7, 5, 1])
    assert selection.count(None, START) == 5  # type: ignore[arg-type]  # no database for IDs
    assert selection.page(None, START, 2) == [1, 3]  # type: ignore[arg-type]
    assert selection.page(None, 3, 10) == [5, 7, 9]  # type: ignore[arg-type]
    assert selection.page(None, 4, 10) == [5, 7, 9]  # type: ignore[arg-type]
    assert selection.count(None, 7) == 1  # type: ignore[arg-type]
    assert selection.page(None, 9, 10) == []  # type: ignore[arg-type]
    assert IdSelection([1, 3, 5, 7, 9]).key == selection.key  # the same set of IDs, the same cursor
    assert IdSelection([1, 3, 5, 7]).key != selection.key


def test_cursor_key_names_the_selection_and_the_champion():
    one, other = IdSelection([1, 2]), IdSelection([1, 3])
    assert cursor_key(one, "v1").startswith("stilltag:backfill:cursor:")
    assert cursor_key(one, "v1") == cursor_key(IdSelection([2, 1]), "v1")
    assert len({cursor_key(one, "v1"), cursor_key(one, "v2"), cursor_key(other, "v1")}) == 3


def test_query_selection_pages_in_ascending_order(sessions):
    selection = QuerySelection("SELECT id AS image_id FROM stills WHERE hidden = 0;")
    with sessions() as s:
        selection.check(s)
        assert selection.count(s, START) == 4
        assert selection.page(s, START, 3) == [1, 3, 5]
        assert selection.page(s, 5, 3) == [7]
        assert selection.count(s, 5) == 1


@pytest.mark.parametrize(("query", "message"), [
    ("SELECT id FROM stills", r"returns columns \['id'\]; it must return one column image_id"),
    ("SELECT id AS image_id, hidden FROM stills", r"returns columns \['image_id', 'hidden'\]"),
    ("SELECT id AS image_id FROM no_such_table", r"--query failed: no such table: no_such_table; it must be"),
])
def test_query_selection_refuses_a_wrong_query_in_one_line(sessions, query, message):
    with sessions() as s, pytest.raises(BackfillError, match=message) as raised:
        QuerySelection(query, name="--query").check(s)
    assert "\n" not in str(raised.value)


def test_empty_query_says_what_to_pass():
    with pytest.raises(BackfillError, match="no backfill query: pass --query"):
        QuerySelection("  ;")


def test_already_done_means_a_status_from_the_champion(sessions):
    set_status(sessions, [(1, "tagged", "v2"), (3, "failed", "v2"), (5, "tagged", "v1"), (7, "failed", "v1")])
    with sessions() as s:
        assert already_done(session=s, ids=[1, 3, 5, 7, 9], champion="v2") == {1, 3}
        assert already_done(session=s, ids=[1, 3, 5, 7, 9], champion="v2", retry_failed=True) == {1}
        assert already_done(session=s, ids=[5, 9], champion="v2") == set()


def test_already_done_checks_long_lists_in_pieces(sessions):
    set_status(sessions, [(i, "tagged", "v1") for i in range(0, 2500, 2)])
    with sessions() as s:
        assert already_done(session=s, ids=list(range(2500)), champion="v1") == set(range(0, 2500, 2))


def test_progress_line_has_counts_rate_and_eta():
    counts = Counts(total=1000, enqueued=300, skipped=100, tagged=250)
    assert progress_line(counts, 20.0) == (
        "backfill: 400/1,000 (40%) enqueued 300 skipped 100 tagged 250 at 20/s, ETA 0:00:30")
    assert progress_line(Counts(total=5), 0.0).endswith("at 0/s, ETA -")
    assert progress_line(Counts(), 1.0).startswith("backfill: 0/0 (100%)")


def test_plain_progress_prints_a_line_every_interval_and_at_the_end():
    now = [0.0]
    lines: list[str] = []
    progress = PlainProgress(lines.append, every_s=10, clock=lambda: now[0])
    counts = Counts(total=100)
    for t, enqueued in [(0, 0), (4, 10), (9.9, 20), (10, 30), (15, 40), (21, 50)]:
        now[0] = t
        counts.enqueued = enqueued
        progress(counts)
    progress.close(counts)
    assert [line.split(" enqueued ")[0] for line in lines] == [
        "backfill: 0/100 (0%)", "backfill: 30/100 (30%)", "backfill: 50/100 (50%)", "backfill: 50/100 (50%)"]


def test_choose_selection(tmp_path):
    plain = Settings(data_dir=tmp_path)
    with_query = Settings(data_dir=tmp_path, backfill_query="SELECT id AS image_id FROM stills")
    assert isinstance(choose_selection(with_query, query="", ids=None, stale=False), QuerySelection)
    assert choose_selection(with_query, query="", ids=None, stale=True).name == "STILLTAG_BACKFILL_QUERY"
    assert choose_selection(with_query, query="SELECT 1 AS image_id", ids=None, stale=True).name == "--query"
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("8\n6\n")
    chosen = choose_selection(plain, query="", ids=ids_file, stale=False)
    assert isinstance(chosen, IdSelection) and chosen.page(None, START, 10) == [6, 8]  # type: ignore[arg-type]
    with pytest.raises(BackfillError, match="say what to backfill"):
        choose_selection(plain, query="", ids=None, stale=False)
    with pytest.raises(BackfillError, match="no backfill query"):
        choose_selection(plain, query="", ids=None, stale=True)
    with pytest.raises(BackfillError, match="--ids selects the images itself"):
        choose_selection(plain, query="SELECT 1 AS image_id", ids=ids_file, stale=False)


def test_stdin_selection_uses_a_dash(tmp_path):
    chosen = choose_selection(Settings(data_dir=tmp_path), query="", ids=Path("-"), stale=False,
                              stdin=io.StringIO("4\n2\n4\n"))
    assert isinstance(chosen, IdSelection) and chosen.count(None, START) == 2  # type: ignore[arg-type]


def test_max_pending_defaults_to_ten_batches(tmp_path):
    assert Settings(data_dir=tmp_path).max_pending == 640
    assert Settings(data_dir=tmp_path, max_batch=8).max_pending == 80
    assert Settings(data_dir=tmp_path, max_batch=8, backfill_max_pending=5).max_pending == 5


def test_retag_on_promote_needs_the_backfill_query(tmp_path):
    with pytest.raises(Exception) as raised:
        Settings(data_dir=tmp_path, retag_on_promote=True)
    known = translate(raised.value)
    assert known is not None and "STILLTAG_RETAG_ON_PROMOTE=true needs STILLTAG_BACKFILL_QUERY" in str(known)
    assert Settings(data_dir=tmp_path, retag_on_promote=True, backfill_query="SELECT 1 AS image_id").retag_on_promote
