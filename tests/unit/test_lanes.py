"""The lanes of ``pytest -n N`` (tests/conftest.py): the first uses the configured Redis server and
every other one a redis-server of its own, which must be a real server and must not outlive the
test process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from bench.stack import poll_until
from tests.conftest import CONFIGURED_REDIS_URL, private_redis_lane, redis_host_url
from tests.servers import LaneRedis, accepts

ROOT = Path(__file__).resolve().parents[2]


def test_only_the_first_lane_and_a_run_without_lanes_use_the_configured_redis():
    assert not private_redis_lane(None)
    assert not private_redis_lane("gw0")
    assert private_redis_lane("gw1")
    assert private_redis_lane("gw7")


def test_this_lane_uses_the_server_its_place_gives_it():
    private = private_redis_lane(os.environ.get("PYTEST_XDIST_WORKER"))
    assert (redis_host_url() != CONFIGURED_REDIS_URL) == private
    with redis.Redis.from_url(redis_host_url()) as client:
        assert client.ping()


def test_a_lane_s_redis_keeps_nothing_on_disk_and_stops():
    server = LaneRedis()
    try:
        with redis.Redis.from_url(f"{server.url}/0") as client:
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("save") == {"save": ""}
    finally:
        server.stop()
    assert not accepts(server.port)
    assert not server.folder.exists()


def test_a_lane_s_redis_dies_with_the_test_process_that_started_it():
    """A lane killed outright (xdist losing a worker, a SIGKILL) leaves no redis-server behind."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom tests.servers import LaneRedis\n"
                               "print(LaneRedis().port, flush=True)\ntime.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(child.stdout.readline())
        assert accepts(port)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    poll_until(lambda: not accepts(port), 10, f"the lane's Redis on {port} stops with its test process")
