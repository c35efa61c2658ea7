"""Retrain runs as the website's admin page sees them: the README's Ruby snippet run by a real Ruby
client, a real training worker taking it, the ``retrain_runs`` rows and the ``stilltag:retrain``
events, and a worker SIGKILLed mid-run whose run the next worker marks failed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.stack import poll_until
from shared.constants import RETRAIN_CHANNEL, RETRAIN_LOCK_KEY, RETRAIN_TASK, TRAINING_QUEUE
from shared.db import retrain_runs, transaction
from shared.errors import SettingsError
from shared.messages import check_envelope, decode_body
from shared.runtime import Runtime
from tests.integration.test_retrain import SMALL_RUN, stop
from tests.learners import seed_website
from tests.unit.test_readme import code_blocks, section
from training import runs
from training.dataset import DatasetError
from training.lock import RetrainBusy
from training.service import with_overrides

pytestmark = pytest.mark.integration

FAST_RUN = {**SMALL_RUN, "train_epochs_frozen": 0, "train_lr": 0.003, "train_image_size": 32}  # one epoch, tiny
N_IMAGES = 80
RUBY_TIMEOUT_S = 60
RUN_WAIT_S = 900  # lr_find's 100 steps and an epoch, on a busy 2-core machine
RUBY_ADVICE = "run ./scripts/test (it installs them), or apt-get install ruby ruby-redis"


def retrain_snippet() -> str:
    blocks = [b for b in code_blocks(section("Retraining"), "ruby") if "def stilltag_retrain" in b]
    assert len(blocks) == 1, "README.md's Retraining section must show the stilltag_retrain Ruby snippet once"
    return blocks[0]


def snippet_definition() -> str:
    """The snippet without its example call: the requires and ``def stilltag_retrain ... end``."""
    match = re.search(r"\A.*?^def stilltag_retrain\(.*?^end\n", retrain_snippet(), flags=re.M | re.S)
    assert match, "the README's snippet no longer defines stilltag_retrain(redis, **train_options)"
    return match[0]


def ruby(code: str, redis_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("ruby")
    if exe is None:
        pytest.fail(f"ruby is not installed: {RUBY_ADVICE}")
    script = tmp_path / "snippet.rb"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | {"STILLTAG_BROKER_URL": redis_url}
    done = subprocess.run([exe, str(script)], env=env, capture_output=True, text=True, timeout=RUBY_TIMEOUT_S)
    if "cannot load such file -- redis" in done.stderr:
        pytest.fail(f"Ruby has no redis gem: {RUBY_ADVICE}")
    return done


def env_for(settings) -> dict[str, str]:
    names = ["data_dir", "database_url", "broker_url", *FAST_RUN]
    # No health server: its fixed port may be in use by another test run on this machine. One torch
    # thread: on a shared, busy CI machine, spinning OpenMP threads made a tiny epoch take minutes.
    return {f"STILLTAG_{n.upper()}": str(getattr(settings, n)) for n in names} | {
        "STILLTAG_METRICS_PORT": "0", "OMP_NUM_THREADS": "1"}


def run_row(settings, run_id: str) -> dict | None:
    rt = Runtime(settings)
    try:
        with rt.sessions() as session:
            return runs.get_run(session=session, run_id=run_id)
    finally:
        rt.close()


def events(pubsub) -> list[dict]:
    """The events received so far (the subscription's own confirmation is not one)."""
    out = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        if message["type"] == "message":
            out.append(json.loads(message["data"]))
    return out


def worker(settings, log_path: Path) -> subprocess.Popen:
    """A real training worker process (``stilltag worker --queues training``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | env_for(settings)
    with log_path.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "stilltag.cli", "worker", "--queues", TRAINING_QUEUE],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


# --- the README's snippet, run by Ruby --------------------------------------------------------
def test_the_readme_snippet_enqueues_a_retrain_the_workers_accept(redis_url, make_settings, tmp_path):
    import redis

    client = redis.Redis.from_url(redis_url)
    done = ruby(retrain_snippet(), redis_url, tmp_path)
    assert done.returncode == 0, done.stderr
    run_id = re.fullmatch(r"retrain (\S+) queued\n", done.stdout)[1]
    assert client.llen(TRAINING_QUEUE) == 1
    envelope, reason = check_envelope(client.rpop(TRAINING_QUEUE))
    assert reason is None, f"the README's retrain envelope is refused: {reason}"
    assert (envelope["headers"]["task"], envelope["headers"]["id"]) == (RETRAIN_TASK, run_id)
    assert envelope["properties"]["delivery_info"]["routing_key"] == TRAINING_QUEUE
    args, kwargs, _embed = decode_body(envelope)
    assert args == [] and kwargs == {"train_epochs_unfrozen": 10}
    assert with_overrides(make_settings(), kwargs).train_epochs_unfrozen == 10

    # A name that is not a train_* option is refused in Ruby, before anything is sent.
    bad = ruby(snippet_definition() + 'stilltag_retrain(Redis.new(url: ENV["STILLTAG_BROKER_URL"]), '
               'database_url: "sqlite://")\n', redis_url, tmp_path)
    assert bad.returncode != 0 and "not retrain options: database_url" in bad.stderr
    assert client.llen(TRAINING_QUEUE) == 0
    client.close()


@pytest.mark.timeout(1200)
def test_a_retrain_from_ruby_is_recorded_and_announced(make_settings, pg_url, redis_url, tmp_path):
    import redis

    settings = make_settings(database_url=pg_url, broker_url=redis_url, **FAST_RUN)
    seed_website(settings, N_IMAGES)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(RETRAIN_CHANNEL)

    call = ('puts stilltag_retrain(Redis.new(url: ENV["STILLTAG_BROKER_URL"]), train_epochs_unfrozen: 1, '
            'train_pretrained: false)\n')
    done = ruby(snippet_definition() + call, redis_url, tmp_path)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert run_row(settings, run_id) is None  # the website's enqueue writes no row; the worker does

    log_path = tmp_path / "training-worker.log"
    proc = worker(settings, log_path)
    try:
        row = poll_until(lambda: (r := run_row(settings, run_id)) and r["state"] in runs.FINISHED and r,
                         RUN_WAIT_S, "the run to finish", interval_s=0.5, detail=lambda: log_tail(log_path))
    finally:
        stop(proc)
    assert row["state"] == "succeeded", (row, log_tail(log_path))
    assert row["version"] == "v1" and row["reason"] and "first model" in row["reason"]
    assert row["options"] == {"train_epochs_unfrozen": 1, "train_pretrained": False}
    assert row["created_at"] <= row["started_at"] <= row["finished_at"]
    assert re.fullmatch(r".+ pid \d+", row["worker"]) and str(proc.pid) in row["worker"]

    seen = events(pubsub)
    assert {e["run_id"] for e in seen} == {run_id}
    states = [e["state"] for e in seen]
    assert states[0] == "queued" and states[-1] == "succeeded", states
    assert states.count("succeeded") == 1 and "running" in states
    assert [e["stage"] for e in seen if e["state"] == "running"][:1] == ["dataset"]
    assert [e["stage"] for e in seen if e["state"] == "running"][1:] == ["lr_find", "unfrozen", "evaluate", "register"]
    assert (row["stage"], row["epoch"], row["n_epochs"]) == ("register", 1, 1)  # the last epoch stays
    assert seen[-1]["version"] == "v1" and seen[-1]["reason"] == row["reason"]
    pubsub.close()
    client.close()


# --- a worker killed mid-run ------------------------------------------------------------------
@pytest.mark.timeout(1200)
def test_a_run_whose_worker_was_killed_fails_when_the_next_worker_starts(make_settings, pg_url, redis_url, tmp_path):
    import redis

    settings = make_settings(database_url=pg_url, broker_url=redis_url, **FAST_RUN)
    seed_website(settings, N_IMAGES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | env_for(settings)

    # `stilltag train` writes the queued row before the message; 20 epochs: it is killed long before.
    from bench.stack import stilltag as run_stilltag

    sent = run_stilltag(env, "train", "--epochs-unfrozen", "20", check=True)
    run_id = re.search(r"enqueued retrain (\S+)", sent.stdout)[1]
    queued = run_row(settings, run_id)
    assert queued["state"] == "queued" and queued["options"] == {"train_epochs_unfrozen": 20}

    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(RETRAIN_CHANNEL)
    first_log = tmp_path / "first-worker.log"
    first = worker(settings, first_log)
    try:
        running = poll_until(
            lambda: (r := run_row(settings, run_id)) and r["state"] == "running" and r["stage"] != "dataset" and r,
            RUN_WAIT_S, "the run to start training", interval_s=0.2, detail=lambda: log_tail(first_log))
        assert running["stage"] in ("lr_find", "unfrozen") and running["started_at"]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert run_row(settings, run_id)["state"] == "running"  # nobody could write it
    assert client.exists(RETRAIN_LOCK_KEY)  # the dead worker's lock has not expired: the pid tells

    second_log = tmp_path / "second-worker.log"
    second = worker(settings, second_log)
    try:
        failed = poll_until(lambda: (r := run_row(settings, run_id)) and r["state"] != "running" and r,
                            RUN_WAIT_S, "the next worker to mark the run failed", interval_s=0.2,
                            detail=lambda: log_tail(second_log))
    finally:
        stop(second)
    assert failed["state"] == "failed" and failed["finished_at"] is not None
    assert re.search(rf"pid {first.pid}\) stopped before the run finished, at stage (lr_find|unfrozen):",
                     failed["reason"]), failed["reason"]
    assert f"pid {second.pid} at its start" in failed["reason"]
    seen = events(pubsub)
    assert [e["state"] for e in seen][-1:] == ["failed"] and seen[-1]["run_id"] == run_id
    assert "running" in [e["state"] for e in seen]
    pubsub.close()
    client.close()


# --- states from the recorder, without training ------------------------------------------------
@pytest.fixture
def sqlite_rt(make_settings):
    from shared.migrate import upgrade

    settings = make_settings()
    upgrade(settings.database_url)
    rt = Runtime(settings)
    yield rt
    rt.close()


def _states(rt) -> dict[str, tuple]:
    with rt.sessions() as session:
        return {r.id: (r.state, r.stage, r.reason) for r in session.execute(sa.select(retrain_runs))}


@pytest.mark.parametrize(("error", "state", "reason"), [
    (RetrainBusy("another retrain is running (h pid 1)"), "skipped", "another retrain is running (h pid 1)"),
    (DatasetError("no tag is used by at least 10 images"), "skipped", "nothing to train on: no tag is used"),
    (SettingsError("unknown retrain option(s) x"), "failed", "SettingsError: unknown retrain option(s) x"),
    (RuntimeError("CUDA out of\nmemory"), "failed", "RuntimeError: CUDA out of memory"),
])
def test_a_run_that_raises_ends_skipped_or_failed_with_the_reason(sqlite_rt, error, state, reason):
    with pytest.raises(type(error)), runs.tracked(sqlite_rt.settings, "r1", {"train_arch": "resnet18"}) as progress:
        progress("stage", {"name": "dataset"})
        raise error
    got_state, _stage, got_reason = _states(sqlite_rt)["r1"]
    assert (got_state, got_reason[: len(reason)]) == (state, reason)


def test_a_run_that_takes_the_lock_fails_the_runs_left_running(sqlite_rt):
    with runs.tracked(sqlite_rt.settings, "dead", {}) as progress:
        progress("stage", {"name": "frozen"})
        with runs.tracked(sqlite_rt.settings, "next", {}) as progress_next:
            assert _states(sqlite_rt)["dead"][0] == "running"
            progress_next("stage", {"name": "dataset"})  # from inside the lock: "dead" cannot be alive
            assert _states(sqlite_rt)["dead"][0] == "failed"
            assert "when run next took the retrain lock" in _states(sqlite_rt)["dead"][2]
            progress_next("done", {"version": "v3", "reason": "first model"})
    assert _states(sqlite_rt)["next"] == ("succeeded", "dataset", "first model")


def test_holder_gone_knows_only_this_host():
    import socket

    host = socket.gethostname()
    assert runs.holder_gone(f"{host} pid {os.getpid()}")  # a former incarnation of this process
    assert not runs.holder_gone(f"{host} pid {os.getppid()}")  # alive
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert runs.holder_gone(f"{host} pid {dead.pid}")
    assert not runs.holder_gone(f"another-{host} pid 1") and not runs.holder_gone(None)


# --- runs a worker on another host left: the running training worker's check -------------------
ELSEWHERE = "gone-host pid 4242"  # a training worker on another host, which this host cannot see die
SWEEP_WAIT_S = 120  # a training worker's start (torch, fastai) on a busy 2-core machine, then two checks


def _running_row(rt, run_id: str, worker: str) -> None:
    with transaction(rt.sessions) as session:
        runs.insert_queued(session=session, run_id=run_id, options={})
        session.execute(sa.update(retrain_runs).where(retrain_runs.c.id == run_id).values(
            state="running", stage="frozen", worker=worker, started_at=runs._now(), updated_at=runs._now()))


def _hold_lock(client, holder: str | None) -> None:
    """The Redis lock as a retrain holds it (``holder`` None: nobody holds it)."""
    if holder is None:
        client.delete(RETRAIN_LOCK_KEY)
    else:
        client.set(RETRAIN_LOCK_KEY, f"{holder} since 2026-11-25T03:00:00+00:00 (0123abcd)")


@pytest.fixture
def redis_rt(make_settings, redis_url):
    import redis

    from shared.migrate import upgrade

    settings = make_settings(broker_url=redis_url)
    upgrade(settings.database_url)
    rt = Runtime(settings)
    client = redis.Redis.from_url(redis_url)
    yield rt, client
    client.close()
    rt.close()


def test_the_check_fails_a_run_once_its_dead_workers_lock_is_gone_and_two_checks_agree(redis_rt):
    rt, client = redis_rt
    _running_row(rt, "dead", ELSEWHERE)
    _hold_lock(client, ELSEWHERE)  # its worker died, its lock has not expired yet
    sweep = runs.OrphanSweep(rt.settings)
    assert sweep.check() == [] and sweep.check() == []  # it may be alive: this host cannot tell
    assert client.get(RETRAIN_LOCK_KEY).decode().startswith(ELSEWHERE)  # read, never taken

    client.delete(RETRAIN_LOCK_KEY)  # the lock expired
    assert sweep.check() == []  # a live run releases the lock a moment before it writes its end
    assert _states(rt)["dead"][0] == "running"
    assert sweep.check() == ["dead"]
    state, stage, reason = _states(rt)["dead"]
    assert (state, stage) == ("failed", "frozen")
    assert reason == (f"the training worker ({ELSEWHERE}) stopped before the run finished, at stage frozen: "
                      f"found by {runs.this_worker()} (no retrain held the lock)")
    assert sweep.check() == []


def test_the_check_spares_a_run_that_writes_between_checks_and_the_run_its_process_records(redis_rt):
    rt, client = redis_rt
    with runs.tracked(rt.settings, "mine", {}) as progress:  # this process's own retrain
        progress("stage", {"name": "frozen"})
        _running_row(rt, "ending", ELSEWHERE)
        _running_row(rt, "unwritten", runs.this_worker())  # this process could not write its end
        _hold_lock(client, None)  # "ending" released the lock a moment ago and writes its end next
        sweep = runs.OrphanSweep(rt.settings)
        assert sweep.check() == []
        with transaction(rt.sessions) as session:  # it wrote its last stage: it was alive at the last check
            session.execute(sa.update(retrain_runs).where(retrain_runs.c.id == "ending")
                            .values(stage="register", updated_at=runs._now() + dt.timedelta(seconds=1)))
        assert sweep.check() == ["unwritten"]
        assert sweep.check() == ["ending"]
        assert sweep.check() == [] and _states(rt)["mine"][0] == "running"
        progress("done", {"version": "v2", "reason": "first model"})
    assert _states(rt)["mine"][0] == "succeeded"
    assert sweep.check() == [] and sweep.check() == []


def test_a_live_run_whose_lock_is_out_of_reach_is_spared_by_its_heartbeat(redis_rt, monkeypatch):
    """Redis cut off from the run's host (not the database): its lock expires, but the run still
    moves its updated_at every HEARTBEAT_S, so no two checks find it the same."""
    rt, client = redis_rt
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.1)
    with runs.tracked(rt.settings, "partitioned", {}) as progress:
        progress("stage", {"name": "frozen"})
        runs._recording.discard("partitioned")  # as another training worker sees it: not its own run
        _hold_lock(client, None)
        sweep = runs.OrphanSweep(rt.settings)
        assert sweep.check() == []
        before = sweep.suspects["partitioned"]
        poll_until(lambda: run_row(rt.settings, "partitioned")["updated_at"] != before, 10, "a heartbeat")
        assert sweep.check() == [] and _states(rt)["partitioned"][0] == "running"
        progress("done", {"version": "v2", "reason": "first model"})
    assert _states(rt)["partitioned"][0] == "succeeded"


def test_a_worker_s_start_leaves_a_run_elsewhere_with_a_free_lock_to_the_two_checks(redis_rt):
    """At a training worker's start, a free lock does not prove a run on another host dead: it may be
    writing its end, or taking its lock again after a Redis outage. The checks decide."""
    rt, client = redis_rt
    _running_row(rt, "quiet", ELSEWHERE)
    _hold_lock(client, None)
    assert runs.recover_orphans(rt.settings) == []
    sweep = runs.OrphanSweep(rt.settings)
    assert sweep.check() == [] and sweep.check() == ["quiet"]


def test_a_retrain_takes_its_lock_again_when_it_expired_while_redis_was_away(redis_url, caplog):
    import logging

    import redis

    from training.lock import redis_lock

    caplog.set_level(logging.WARNING, logger="training.lock")
    client = redis.Redis.from_url(redis_url)
    other = "another-host pid 9 since 2026-11-25T03:00:00+00:00 (0123abcd)"
    try:
        with redis_lock(redis_url, ttl_s=1) as holder:  # renewed every 0.2 s
            client.delete(RETRAIN_LOCK_KEY)  # expired while Redis was out of reach, or lost in a restart
            poll_until(lambda: client.get(RETRAIN_LOCK_KEY) == holder.encode(), 10, "the lock taken again")
            assert "had expired (Redis out of reach?); taken again" in caplog.text
            client.set(RETRAIN_LOCK_KEY, other)  # another retrain took it meanwhile: it is not taken back
            poll_until(lambda: "was lost to" in caplog.text, 10, "the renewer to find the lock lost")
            assert client.get(RETRAIN_LOCK_KEY).decode() == other
        assert client.get(RETRAIN_LOCK_KEY).decode() == other  # nor released: it is not its own
    finally:
        client.delete(RETRAIN_LOCK_KEY)
        client.close()


def test_a_run_whose_worker_no_longer_holds_the_lock_is_failed_at_a_workers_start(redis_rt):
    rt, client = redis_rt
    _running_row(rt, "dead", ELSEWHERE)
    _running_row(rt, "alive", "other-host pid 7")
    _hold_lock(client, "other-host pid 7")  # another run holds the lock: "dead"'s worker is not alive
    assert runs.recover_orphans(rt.settings) == ["dead"]
    assert "the retrain lock was held by other-host pid 7 since" in _states(rt)["dead"][2]
    assert _states(rt)["alive"][0] == "running"


HOLD_FILE_LOCK = """
import sys
from pathlib import Path
from training.lock import file_lock
with file_lock(Path(sys.argv[1])) as holder:
    print(holder, flush=True)
    sys.stdin.read()
"""


def test_the_file_lock_s_line_is_a_holder_only_while_the_kernel_says_the_file_is_locked(make_settings):
    """The filesystem broker's lock: a process holds the file (flock) and wrote its line. Killed, the
    kernel frees the lock but the line stays; the line's pid may even be reused by a live process."""
    from shared.constants import RETRAIN_LOCK_FILE
    from shared.migrate import upgrade

    settings = make_settings()
    upgrade(settings.database_url)
    lock_file = settings.data_dir / RETRAIN_LOCK_FILE
    repo = Path(__file__).resolve().parents[2]
    holder_proc = subprocess.Popen([sys.executable, "-c", HOLD_FILE_LOCK, str(lock_file)], cwd=repo, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    rt = Runtime(settings)
    try:
        holder = holder_proc.stdout.readline().strip()  # the lock is held once it says who holds it
        worker = holder.split(" since ")[0]
        assert worker.endswith(f" pid {holder_proc.pid}")
        _running_row(rt, "alive", worker)
        sweep = runs.OrphanSweep(settings)
        assert runs.recover_orphans(settings) == [] and sweep.check() == [] and sweep.check() == []

        holder_proc.kill()  # SIGKILL: the kernel frees the lock, the line stays
        holder_proc.wait()
        assert lock_file.read_text().strip() == holder
        assert runs.recover_orphans(settings) == ["alive"]  # same host, no such pid: at once

        # The same line, its pid now a live process's (reused): no flock, so not a holder either.
        reused = f"{worker.split(' pid ')[0]} pid {os.getppid()}"
        _running_row(rt, "reused", reused)
        lock_file.write_text(f"{reused} since 2026-11-25T03:00:00+00:00 (0123abcd)\n")
        assert runs.recover_orphans(settings) == []  # a free lock is left to the two checks
        assert sweep.check() == [] and sweep.check() == ["reused"]
    finally:
        if holder_proc.poll() is None:
            holder_proc.kill()
        holder_proc.communicate()  # waits, and closes its pipes
        rt.close()


def test_a_running_training_worker_fails_a_run_left_on_another_host_once_its_lock_expires(
        make_settings, pg_url, redis_url, tmp_path):
    import redis

    from shared.celery_app import create_app
    from shared.migrate import upgrade

    settings = make_settings(database_url=pg_url, broker_url=redis_url, orphan_check_s=0.5)
    upgrade(settings.database_url)
    rt = Runtime(settings)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(RETRAIN_CHANNEL)
    _running_row(rt, "left", ELSEWHERE)
    _hold_lock(client, ELSEWHERE)  # its worker died a moment ago: the lock has not expired
    log_path = tmp_path / "training-worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | env_for(settings) | {
        "STILLTAG_ORPHAN_CHECK_S": "0.5"}
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stilltag.cli", "worker", "--queues", TRAINING_QUEUE],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    app = create_app(settings)
    try:
        node = f"training.{proc.pid}@"

        def consuming() -> bool:  # past its start (and its recover_orphans): Celery answers
            try:
                return any(name.startswith(node) for name in app.control.inspect(timeout=1).ping() or {})
            except Exception:
                return False

        poll_until(consuming, SWEEP_WAIT_S, "the training worker to answer inspect ping",
                   detail=lambda: log_tail(log_path))
        assert run_row(settings, "left")["state"] == "running"  # at its start, the lock was held
        client.delete(RETRAIN_LOCK_KEY)  # the dead worker's lock expires
        failed = poll_until(lambda: (r := run_row(settings, "left")) and r["state"] != "running" and r,
                            SWEEP_WAIT_S, "the worker's check to fail the run", interval_s=0.2,
                            detail=lambda: log_tail(log_path))
    finally:
        stop(proc)
        app.close()
        rt.close()
    assert failed["state"] == "failed" and failed["finished_at"] is not None
    host = runs.this_worker().split(" pid ")[0]
    assert failed["reason"] == (f"the training worker ({ELSEWHERE}) stopped before the run finished, at stage frozen: "
                                f"found by {host} pid {proc.pid} (no retrain held the lock)")
    assert [(e["run_id"], e["state"]) for e in events(pubsub)] == [("left", "failed")]
    pubsub.close()
    client.close()
