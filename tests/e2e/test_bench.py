"""``stilltag bench --quick`` runs end to end (real Redis, a real worker process) and writes its JSON.

Only that the benchmark works is tested: no speed is asserted, because a slow machine is not a bug.
"""

import json
import os

import pytest

from bench.profile import read_raw
from bench.stack import stilltag
from demo.synthetic import VOCAB
from shared.config import ENV_PREFIX
from tests.conftest import redis_host_url
from worker.model import resolve_precision

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# limit_one_pass: the same forward pass over the whole batch at once (STILLTAG_CPU_STREAMS=1), on a CPU.
RATES = ("baseline_img_s", "fastai_batched_img_s", "limit_img_s", "limit_one_pass_img_s", "decode_and_forward_img_s",
         "end_to_end_img_s")
LATENCIES = ("trickle_p50_ms", "trickle_p95_ms", "behind_backfill_ms")


def test_quick_bench_writes_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    done = stilltag(env, "bench", "--quick", "--device", "cpu", "--redis", redis_host_url(), "--json", str(out),
                    "--profile", str(tmp_path / "profile"), "--variant", "nice0:STILLTAG_DECODE_NICE=0",
                    check=False, timeout_s=840)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["arch"] == "resnet18"
    assert result["device"] == "cpu"
    assert result["max_batch"] > 0 and result["images"] > 0
    for key in (*RATES, *LATENCIES):
        assert result[key] > 0, key
    assert "end to end" in done.stdout  # the table was printed

    # Rounds: every rate measured once per round; the reported value is their median, within the spread.
    assert result["rounds"] == 3
    for key in RATES:
        rounds, (lo, hi) = result[f"{key}_rounds"], result[f"{key}_spread"]
        assert len(rounds) == 3 and all(r > 0 for r in rounds), key
        assert (lo, hi) == (min(rounds), max(rounds)), key
        assert result[key] == sorted(rounds)[1], key
    assert result["end_to_end_vs_limit"] == result["end_to_end_img_s"] / result["limit_img_s"]
    assert result["decode_and_forward_vs_limit"] == result["decode_and_forward_img_s"] / result["limit_img_s"]
    assert result["end_to_end_vs_decode_and_forward"] == result["end_to_end_img_s"] / result["decode_and_forward_img_s"]
    assert "decode +" in done.stdout and "one pass:" in done.stdout  # their rows

    # A variant: another worker with other settings, in the same rounds, and its uploads behind a backlog.
    rounds, (lo, hi) = result["variant_nice0_img_s_rounds"], result["variant_nice0_img_s_spread"]
    assert len(rounds) == 3 and (lo, hi) == (min(rounds), max(rounds)) and result["variant_nice0_img_s"] == sorted(rounds)[1]
    assert 0 < result["variant_nice0_behind_backfill_p50_ms"] <= result["variant_nice0_behind_backfill_ms"]
    assert "nice0:" in done.stdout and "variant nice0: behind backfill" in done.stdout  # their rows

    # Uploads behind a backlog: the worst of several, next to its target (two forward passes at max_batch).
    assert 0 < result["behind_backfill_p50_ms"] <= result["behind_backfill_ms"]
    assert result["behind_backfill_target_ms"] == pytest.approx(
        result["max_wait_ms"] + 2000 * result["max_batch"] / result["limit_img_s"] + 100)
    assert ("behind backfill ms", result["behind_backfill_ms"], result["behind_backfill_target_ms"]) in [
        tuple(t) for t in result["targets"]]

    # Load: 1, 5 and 15 minute averages at the start and the end, and the core count.
    assert result["cores"] == os.cpu_count()
    for key in ("load_avg_start", "load_avg_end"):
        assert len(result[key]) == 3 and all(x >= 0 for x in result[key]), key
    assert result["busy_machine"] == (max(result["load_avg_start"][0], result["load_avg_end"][0]) > os.cpu_count() / 2)
    assert "load average" in done.stdout

    # Precision and parity: each reduced mode against fp32 on the (briefly trained) learner.
    # auto: bf16 only on a CPU with native bf16 and for a learner whose bf16 parity holds (README,
    # "Precision"); the worker resolved it for itself from the record stored with the champion.
    expected = resolve_precision("auto", "cpu", parity_records=result["parity"])[0]
    assert (result["precision_setting"], result["precision"], result["worker_precision"]) == ("auto", expected, expected)
    for precision in ("bf16", "fp16"):
        fig = result["parity"][precision]
        assert fig["decisions"] == 16 * len(VOCAB) and 0 <= fig["flips"] <= fig["decisions"], precision
        assert 0 < fig["p99_diff"] <= fig["max_diff"] < 0.1, precision
        assert fig["flip_share"] == fig["flips"] / fig["decisions"], precision
    own = result["parity"].get(expected, {"max_diff": 0, "p99_diff": 0, "flip_share": 0})  # fp32: 0
    assert (result["parity_max_diff"], result["parity_p99_diff"], result["parity_flip_share"]) == (
        own["max_diff"], own["p99_diff"], own["flip_share"])

    # The worker's profile over the end-to-end rounds: CPU per thread from /proc, stages from py-spy.
    profile = result["profile"]
    assert profile == json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert profile["wall_s"] > 0 and profile["cores"] == os.cpu_count()
    threads = profile["cpu_s_by_thread"]
    assert threads["prepare (fetch + decode pool)"] > 0, threads
    stages = profile["stages"]
    # On a CPU the inference thread hands a batch's sub-batches to the forward threads (STILLTAG_CPU_STREAMS)
    # and waits: py-spy, which names threads, may not catch it running at all in so short a run.
    assert threads["forward (CPU sub-batches)"] > 0, threads
    assert stages["forward (CPU sub-batches): forward pass"]["running_s"] > 0, stages
    assert stages["prepare (fetch + decode pool): decode"]["running_s"] > 0, stages
    # The --gil recording has samples too. The stage table rounds to 0.1 s, and this run's profile
    # is about a second long: a handful of samples, each stage's under 0.05 s, so count them raw.
    gil_samples, _ = read_raw(tmp_path / "profile" / "pyspy-gil.txt")
    assert sum(gil_samples.values()) > 0, stages
    assert "CPU seconds by thread" in done.stdout


def test_a_learner_that_is_not_a_file_is_refused_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    done = stilltag(env, "bench", "--quick", "--learner", str(tmp_path / "nope.pkl"), check=False)
    assert done.returncode != 0
    assert "nope.pkl is not a file; pass an export.pkl written by learn.export()" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
