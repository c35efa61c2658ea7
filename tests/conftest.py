"""Shared fixtures: real PostgreSQL databases and Redis DB numbers made and removed per test,
settings built for each test, and a small real fastai learner."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from bench.stack import claim_postgres, claim_redis_db
from shared.config import ENV_PREFIX, Settings

PG_ADMIN_URL = os.environ.get("STILLTAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CONFIGURED_REDIS_URL = os.environ.get("STILLTAG_TEST_REDIS", "redis://127.0.0.1:6379")

# ``pytest -n N`` (scripts/test) runs N lanes side by side, each an xdist worker. The first lane
# (gw0), and a run without xdist, uses the Redis server the environment names (STILLTAG_TEST_REDIS,
# else the machine's own); every other lane starts a redis-server of its own (tests/servers.py,
# LaneRedis). The stilltag:tagged and stilltag:retrain channels are a whole server's, not one DB's:
# two tests running at once on one server would hear each other's events.
_lane_redis = None


def private_redis_lane(worker: str | None) -> bool:
    """Whether the lane of xdist worker ``worker`` (None: no xdist) starts a Redis server of its own."""
    return worker not in (None, "gw0")


def pytest_configure(config):
    global _lane_redis
    if private_redis_lane(os.environ.get("PYTEST_XDIST_WORKER")):
        from tests.servers import LaneRedis

        _lane_redis = LaneRedis()


def pytest_unconfigure(config):
    global _lane_redis
    if _lane_redis is not None:
        _lane_redis.stop()
        _lane_redis = None


def redis_host_url() -> str:
    """The Redis server of this lane (``redis://host:port``, no DB number)."""
    return _lane_redis.url if _lane_redis is not None else CONFIGURED_REDIS_URL


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The lanes take whole test modules (a module's tests share its module fixtures, such as
    tests/e2e's running worker), each the next module when it is nearly done, in collection order:
    tests/e2e, the longest, first, and the many short unit tests last, to even out the ends.
    xdist's loadscope, without its reordering by number of tests."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False
    return LoadScopeScheduling(config, log)


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
    """A Redis DB number on this lane's server that is empty now (a context manager), claimed
    atomically, flushed afterwards."""
    return claim_redis_db(redis_host_url())


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
    """A real exported fastai learner (resnet18 at 64 px, two epochs on generated pictures), trained
    once per run: the lanes of ``pytest -n N`` share the first one's (pytest's base temporary folder
    of a worker is a folder of the run's own)."""
    from tests.learners import train_tiny_learner

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "tiny-learner"
    with open(shared / "tiny-learner.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other lanes wait for the first one's training
        if not (folder / "export.pkl").exists():
            folder.mkdir(exist_ok=True)
            train_tiny_learner(folder)
    return folder / "export.pkl"


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
