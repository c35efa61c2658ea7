"""The dataset export: query formats, bound parameters, rare tags, and the stable holdout rule.

Runs against SQLite and a real PostgreSQL database.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from shared.db import image_tags, make_engine, session_factory, transaction
from shared.migrate import upgrade
from training.dataset import (
    DatasetError,
    collect,
    drop_rare_tags,
    export_dataset,
    in_holdout,
    query_params,
    read_rows,
    split,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database(request, make_settings, tmp_path):
    """A migrated database with the demo ``image_tags`` table, on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'dataset.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


def fill(sessions, labels: dict[int, set[str]]) -> None:
    rows = [{"image_id": i, "tag": t} for i, tags in labels.items() for t in tags]
    with transaction(sessions) as session:
        session.execute(sa.insert(image_tags), rows)


def test_one_tag_per_row_and_space_separated_give_the_same_labels(database):
    _url, sessions = database
    fill(sessions, {1: {"cat", "dog"}, 2: {"cat"}})
    with sessions() as session:
        one = collect(read_rows(session=session, query="SELECT image_id, tag FROM image_tags"))
        dialect = session.bind.dialect.name
        agg = "group_concat(tag, ' ')" if dialect == "sqlite" else "string_agg(tag, ' ')"
        many = collect(read_rows(session=session, query=f"SELECT image_id, {agg} AS tags FROM image_tags GROUP BY image_id"))
    assert one == many == {1: {"cat", "dog"}, 2: {"cat"}}


def test_a_tag_with_spaces_survives_one_row_per_tag(database):
    _, sessions = database
    fill(sessions, {1: {"night sky"}})
    with sessions() as session:
        assert collect(read_rows(session=session, query="SELECT image_id, tag FROM image_tags")) == {1: {"night sky"}}


def test_wrong_columns_say_what_the_query_must_return(database):
    _, sessions = database
    with sessions() as session, pytest.raises(DatasetError, match="image_id and either `tag`"):
        list(read_rows(session=session, query="SELECT image_id FROM image_tags"))


def test_rare_tags_and_then_untagged_images_are_left_out():
    labels = {1: {"cat", "rare"}, 2: {"cat"}, 3: {"rare"}, 4: {"cat", "dog"}, 5: {"dog"}}
    kept, vocab, dropped, dropped_images = drop_rare_tags(labels, min_images=2)
    assert vocab == ["cat", "dog", "rare"]
    kept, vocab, dropped, dropped_images = drop_rare_tags(labels, min_images=3)
    assert vocab == ["cat"]
    assert dropped == {"dog": 2, "rare": 2}
    assert kept == {1: ("cat",), 2: ("cat",), 4: ("cat",)}
    assert dropped_images == 2  # images 3 and 5 had only rare tags


def test_holdout_is_stable_and_independent_of_order_and_of_later_images():
    ids = list(range(1, 5001))
    labels = {i: ("t",) for i in ids}
    _, _, holdout = split(labels, seed="s", pct=10)
    share = len(holdout) / len(ids)
    assert 0.08 < share < 0.12
    # Later images join by the same rule; the earlier ones do not move.
    more = {i: ("t",) for i in range(1, 7001)}
    _, _, holdout_later = split(more, seed="s", pct=10)
    assert [e.image_id for e in holdout_later if e.image_id <= 5000] == [e.image_id for e in holdout]
    # The rule depends only on (seed, image_id): a dict in another order gives the same split.
    reversed_labels = dict(reversed(list(labels.items())))
    assert split(reversed_labels, seed="s", pct=10) == split(labels, seed="s", pct=10)
    # Another seed is another holdout.
    assert {e.image_id for e in split(labels, seed="other", pct=10)[2]} != {e.image_id for e in holdout}
    assert in_holdout(holdout[0].image_id, seed="s", pct=10)


def test_train_valid_holdout_do_not_overlap():
    labels = {i: ("t",) for i in range(1, 2001)}
    train, valid, holdout = split(labels, seed="s", pct=10)
    sets = [{e.image_id for e in part} for part in (train, valid, holdout)]
    assert sum(map(len, sets)) == 2000 and len(set().union(*sets)) == 2000
    assert 0.06 < len(sets[1]) / 2000 < 0.12  # 10 % of the non-holdout images


def test_only_named_parameters_are_bound():
    offered = {"snapshot_at": 1, "min_tag_images": 2}
    assert query_params("SELECT image_id, tag FROM t WHERE created_at <= :snapshot_at", offered) == {"snapshot_at": 1}
    assert query_params("SELECT image_id, tag::text AS tag FROM t", offered) == {}  # a cast is not a parameter


def test_export_with_bound_parameters_and_the_split(database, make_settings):
    url, sessions = database
    labels = {i: {"common", "even" if i % 2 == 0 else "odd"} | ({"rare"} if i < 3 else set()) for i in range(1, 201)}
    fill(sessions, labels)
    # A query using both offered parameters; they are bound, never formatted into the SQL.
    query = ("SELECT image_id, tag FROM image_tags WHERE tag IN "
             "(SELECT tag FROM image_tags GROUP BY tag HAVING COUNT(*) >= :min_tag_images) "
             "AND :snapshot_at IS NOT NULL ORDER BY image_id")
    settings = make_settings(database_url=url, dataset_query=query, train_min_tag_images=3, holdout_pct=10)
    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    with sessions() as session:
        ds = export_dataset(session=session, settings=settings, now=now)
    assert ds.vocab == ["common", "even", "odd"]
    assert ds.size == 200 and ds.snapshot_at == now
    assert all(e.tags in (("common", "even"), ("common", "odd")) for e in ds.train + ds.valid + ds.holdout)
    assert [e.image_id for e in ds.holdout] == [i for i in range(1, 201) if in_holdout(i, seed="stilltag", pct=10)]


def test_rails_style_schema(database, make_settings):
    """The README's example: acts-as-taggable-on's ``taggings`` joined to ``tags``."""
    url, sessions = database
    with transaction(sessions) as session:
        session.execute(sa.text("CREATE TABLE tags (id INTEGER PRIMARY KEY, name VARCHAR(255))"))
        session.execute(sa.text("CREATE TABLE taggings (id INTEGER PRIMARY KEY, tag_id INTEGER, taggable_id INTEGER, "
                                "taggable_type VARCHAR(255), context VARCHAR(128))"))
        session.execute(sa.text("INSERT INTO tags (id, name) VALUES (1, 'cat'), (2, 'dog')"))
        rows = [{"id": n, "tag": 1 + n % 2, "image": n, "type": "Still" if n % 10 else "User"} for n in range(1, 101)]
        session.execute(sa.text("INSERT INTO taggings (id, tag_id, taggable_id, taggable_type, context) "
                                "VALUES (:id, :tag, :image, :type, 'tags')"), rows)
    query = ("SELECT taggings.taggable_id AS image_id, tags.name AS tag FROM taggings "
             "JOIN tags ON tags.id = taggings.tag_id "
             "WHERE taggings.taggable_type = 'Still' AND taggings.context = 'tags'")
    settings = make_settings(database_url=url, dataset_query=query, train_min_tag_images=1, holdout_pct=10)
    with sessions() as session:
        ds = export_dataset(session=session, settings=settings)
    assert ds.vocab == ["cat", "dog"] and ds.size == 90  # the 10 'User' taggings are not stills


def test_too_little_data_says_what_to_do(database, make_settings):
    url, sessions = database
    fill(sessions, {1: {"cat"}, 2: {"cat"}})
    settings = make_settings(database_url=url, train_min_tag_images=5)
    with sessions() as session, pytest.raises(DatasetError, match="STILLTAG_TRAIN_MIN_TAG_IMAGES"):
        export_dataset(session=session, settings=settings)
    settings = make_settings(database_url=url, train_min_tag_images=1)
    with sessions() as session, pytest.raises(DatasetError, match="set is empty"):
        export_dataset(session=session, settings=settings)


# --- groups (group_id): no group straddles train and holdout ---------------------------------

# The README's query for a Rails schema whose stills belong to movies.
GROUP_QUERY = ("SELECT taggings.taggable_id AS image_id, tags.name AS tag, stills.movie_id AS group_id "
               "FROM taggings JOIN tags ON tags.id = taggings.tag_id JOIN stills ON stills.id = taggings.taggable_id "
               "WHERE taggings.taggable_type = 'Still' AND taggings.context = 'tags'")


def _parts(ds) -> dict[str, set[int]]:
    return {"train": {e.image_id for e in ds.train}, "valid": {e.image_id for e in ds.valid},
            "holdout": {e.image_id for e in ds.holdout}}


def test_a_group_column_keeps_each_movie_on_one_side(database, make_settings):
    url, sessions = database
    movie_of = {n: 1 + n // 7 for n in range(1, 701)}  # 100 movies of ~7 stills
    with transaction(sessions) as session:
        session.execute(sa.text("CREATE TABLE tags (id INTEGER PRIMARY KEY, name VARCHAR(255))"))
        session.execute(sa.text("CREATE TABLE stills (id INTEGER PRIMARY KEY, movie_id INTEGER)"))
        session.execute(sa.text("CREATE TABLE taggings (id INTEGER PRIMARY KEY, tag_id INTEGER, taggable_id INTEGER, "
                                "taggable_type VARCHAR(255), context VARCHAR(128))"))
        session.execute(sa.text("INSERT INTO tags (id, name) VALUES (1, 'cat'), (2, 'dog')"))
        session.execute(sa.text("INSERT INTO stills (id, movie_id) VALUES (:id, :movie)"),
                        [{"id": n, "movie": m} for n, m in movie_of.items()])
        session.execute(sa.text("INSERT INTO taggings (id, tag_id, taggable_id, taggable_type, context) "
                                "VALUES (:id, :tag, :image, 'Still', 'tags')"),
                        [{"id": n, "tag": 1 + n % 2, "image": n} for n in movie_of])
    settings = make_settings(database_url=url, dataset_query=GROUP_QUERY, train_min_tag_images=1, holdout_pct=10)
    with sessions() as session:
        ds = export_dataset(session=session, settings=settings)
    assert ds.size == 700 and ds.groups == 101
    parts = _parts(ds)
    movies = {name: {movie_of[i] for i in ids} for name, ids in parts.items()}
    assert movies["holdout"] and movies["valid"] and movies["train"]
    assert not movies["train"] & movies["holdout"]
    assert not movies["train"] & movies["valid"]
    assert not movies["valid"] & movies["holdout"]
    # The same images split by image ID (no group column) would put movies on both sides.
    by_image = split({i: ("cat",) for i in movie_of}, seed="stilltag", pct=10)
    train_movies = {movie_of[e.image_id] for e in by_image[0]}
    assert train_movies & {movie_of[e.image_id] for e in by_image[2]}


def test_without_a_group_the_split_is_the_image_id_rule():
    """The rule images were split by before groups existed: sha256 of seed, salt and image ID."""
    import hashlib

    def old_bucket(seed: str, image_id: int, salt: str = "") -> int:
        return int.from_bytes(hashlib.sha256(f"{seed}:{salt}:{image_id}".encode()).digest()[:8], "big") % 10_000

    labels = {i: ("a",) for i in range(1, 2001)}
    train, valid, holdout = split(labels, seed="s", pct=10)
    assert [e.image_id for e in holdout] == [i for i in labels if old_bucket("s", i) < 1000]
    assert [e.image_id for e in valid] == [i for i in labels if old_bucket("s", i) >= 1000
                                          and old_bucket("s", i, "valid") < 1000]
    assert split(labels, seed="s", pct=10, groups={}) == (train, valid, holdout)


def test_images_with_a_null_group_are_split_by_their_own_id(database, make_settings):
    url, sessions = database
    fill(sessions, {i: {"a"} for i in range(1, 301)})
    query = "SELECT image_id, tag, CASE WHEN image_id <= 150 THEN 7 END AS group_id FROM image_tags"
    settings = make_settings(database_url=url, dataset_query=query, train_min_tag_images=1, holdout_pct=10)
    with sessions() as session:
        ds = export_dataset(session=session, settings=settings)
    parts = _parts(ds)
    side = [name for name, ids in parts.items() if set(range(1, 151)) <= ids]
    assert len(side) == 1  # group 7 is on one side, whole
    ungrouped = {name: ids - set(range(1, 151)) for name, ids in parts.items()}
    _, _, holdout = split({i: ("a",) for i in range(151, 301)}, seed="stilltag", pct=10)
    assert ungrouped["holdout"] == {e.image_id for e in holdout}


def test_a_third_column_must_be_group_id(database):
    _, sessions = database
    fill(sessions, {1: {"a"}})
    with sessions() as session, pytest.raises(DatasetError, match="group_id"):
        list(read_rows(session=session, query="SELECT image_id, tag, tag AS movie FROM image_tags"))
