"""``stilltag bench --quick`` runs end to end (real Redis, a real worker process) and writes its JSON.

Only that the benchmark works is tested: no speed is asserted, because a slow machine is not a bug.
"""

import json
import os

import pytest

from bench.stack import stilltag
from shared.config import ENV_PREFIX
from tests.conftest import REDIS_HOST_URL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

RATES = ("baseline_img_s", "fastai_batched_img_s", "limit_img_s", "end_to_end_img_s")
LATENCIES = ("trickle_p50_ms", "trickle_p95_ms", "behind_backfill_ms")


def test_quick_bench_writes_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    done = stilltag(env, "bench", "--quick", "--device", "cpu", "--redis", REDIS_HOST_URL, "--json", str(out),
                    check=False, timeout_s=840)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["arch"] == "resnet18"
    assert result["device"] == "cpu"
    assert result["max_batch"] > 0 and result["images"] > 0
    for key in (*RATES, *LATENCIES):
        assert result[key] > 0, key
    assert "end to end" in done.stdout  # the table was printed
