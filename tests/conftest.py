"""Shared fixtures: real PostgreSQL databases and Redis DB numbers made and removed per test,
settings built for each test, and a small real fastai learner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.stack import claim_postgres, claim_redis_db
from shared.config import ENV_PREFIX, Settings

PG_ADMIN_URL = os.environ.get("STILLTAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST_URL = os.environ.get("STILLTAG_TEST_REDIS", "redis://127.0.0.1:6379")

# The ``apart`` lane of ``pytest -n 2`` (scripts/test): the unit tests, and the tests whose workers
# and commands reach only servers of their own (tests/servers.py). Every other test runs in the
# ``shared`` lane, one after another: the stilltag:tagged and stilltag:retrain channels are the
# whole Redis server's, not one DB's, so two tests on the machine's Redis would hear each other's
# events. The fault drill and the outage tests spend most of their time waiting on timers and
# restarts, and the unit tests fill the core that leaves idle.
APART = (
    "tests/unit/",
    "tests/e2e/test_fault_drill.py::",
    "tests/e2e/test_backfill.py::test_backfill_survives_a_redis_outage",
    "tests/integration/test_consumer_broker.py::test_on_a_redis_without_blmove_an_idle_pop_polls",
)


def lane(nodeid: str) -> str:
    return "apart" if nodeid.startswith(APART) else "shared"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Two work units for pytest-xdist, the lanes; each runs its tests in their collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return Lanes(config, log)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The learners this process trains and runs are tiny, and it shares the machine's cores with the
    workers and command lines the tests start: with a thread per core, torch's spinning OpenMP
    threads wait on each other (a tiny training run took twice as long on a busy 2-core machine).
    The processes the tests start keep their own settings."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_stilltag_env(monkeypatch):
    """Tests build their own settings; nothing from the caller's shell leaks in."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) and not name.startswith(ENV_PREFIX + "TEST_"):
            monkeypatch.delenv(name)


def pg_database():
    """A fresh, empty PostgreSQL database (a context manager), dropped afterwards."""
    return claim_postgres(PG_ADMIN_URL, prefix="stilltag_test")


def redis_database():
    """A Redis DB number that is empty now (a context manager), claimed atomically, flushed afterwards."""
    return claim_redis_db(REDIS_HOST_URL)


@pytest.fixture
def pg_url():
    with pg_database() as url:
        yield url


@pytest.fixture
def redis_url():
    with redis_database() as url:
        yield url


@pytest.fixture
def make_settings(tmp_path):
    """``make_settings(**overrides)`` → Settings rooted in this test's temporary folder."""

    def build(**overrides) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        return Settings(**overrides)

    return build


@pytest.fixture(scope="session")
def tiny_learner(tmp_path_factory) -> Path:
    """A real exported fastai learner (resnet18 at 64 px, one epoch on generated pictures)."""
    from tests.learners import train_tiny_learner

    return train_tiny_learner(tmp_path_factory.mktemp("tiny-learner"))


class S3Server:
    """moto's standalone S3-compatible server, over HTTP on a free local port."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def stop(self):
        self._server.stop()


@pytest.fixture
def s3_server(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stilltag-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stilltag-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server()
    yield server
    server.stop()
