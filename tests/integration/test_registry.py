"""The model registry on both stores: file:// and s3:// through moto's server over HTTP."""

import pytest

from shared import registry
from shared.db import make_engine, session_factory, transaction
from shared.migrate import upgrade
from shared.stores import open_store

pytestmark = pytest.mark.integration


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'models'}")
    s3 = request.getfixturevalue("s3_server")
    s3.client.create_bucket(Bucket="models")
    return open_store("s3://models/stilltag", endpoint_url=s3.endpoint)


def _artifact(tmp_path, content: bytes):
    path = tmp_path / f"export-{len(content)}.pkl"
    path.write_bytes(content)
    return path


def test_register_promote_rollback(sessions, store, tmp_path):
    with transaction(sessions) as s:
        v1 = registry.register(session=s, store=store, artifact=_artifact(tmp_path, b"one"), arch="resnet18", vocab=["a"])
        assert v1.version == "v1" and v1.status == "candidate"
        registry.promote(session=s, version="v1")
        v2 = registry.register(session=s, store=store, artifact=_artifact(tmp_path, b"two!"), arch="resnet18", vocab=["a"])
        registry.promote(session=s, version=v2.version)
    with sessions() as s:
        assert registry.champion_version(session=s) == "v2"
        assert registry.get_version(session=s, version="v1").status == "retired"
    with transaction(sessions) as s:
        assert registry.rollback(session=s).version == "v1"
    with sessions() as s:
        assert registry.champion_version(session=s) == "v1"
        assert registry.get_version(session=s, version="v2").status == "rolled_back"
    with transaction(sessions) as s, pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(session=s)


def test_artifact_is_fetched_only_when_its_sha256_matches(sessions, store, tmp_path):
    with transaction(sessions) as s:
        rec = registry.register(session=s, store=store, artifact=_artifact(tmp_path, b"model"), arch="x", vocab=[])
    cache = tmp_path / "cache"
    local = registry.fetch_artifact(store=store, record=rec, cache_dir=cache)
    assert local.read_bytes() == b"model"
    store.put(f"{rec.version}/export.pkl", b"tampered")  # someone swaps the stored file
    local.unlink()
    with pytest.raises(registry.ArtifactMismatch, match="refusing to unpickle"):
        registry.fetch_artifact(store=store, record=rec, cache_dir=cache)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_the_champion_poll_reads_its_parity_records(db, tmp_path, request):
    """What tagging workers poll: the champion's version and just its parity records, on both databases."""
    url = f"sqlite:///{tmp_path / 'poll.db'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    store = open_store(f"file://{tmp_path / 'models'}")
    record = {"max_diff": 0.0059, "p99_diff": 0.0043, "flip_share": 0.0, "within_limits": True}
    try:
        with sessions() as s:
            assert registry.champion_parity(session=s) is None
        with transaction(sessions) as s:
            registry.register(session=s, store=store, artifact=_artifact(tmp_path, b"one"), arch="resnet18",
                              vocab=["a"], metrics={"f2": 0.5})
            registry.promote(session=s, version="v1")
        with sessions() as s:
            assert registry.champion_parity(session=s) == ("v1", {})  # registered by hand: none
        with transaction(sessions) as s:
            registry.add_metrics(session=s, version="v1", precision_parity={"fp16": record})
        with sessions() as s:
            assert registry.champion_parity(session=s) == ("v1", {"fp16": record})
        with transaction(sessions) as s:  # ``stilltag models measure``: both, replacing what was there
            registry.add_metrics(session=s, version="v1", precision_parity={"bf16": record, "fp16": record})
        with sessions() as s:
            assert registry.champion_parity(session=s) == ("v1", {"bf16": record, "fp16": record})
        with transaction(sessions) as s:
            registry.add_metrics(session=s, version="v1", precision_parity={"bf16": "garbage", "fp16": record})
        with sessions() as s:
            assert registry.champion_parity(session=s) == ("v1", {"fp16": record})
    finally:
        engine.dispose()
