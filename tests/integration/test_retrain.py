"""Retraining for real: generated pictures, a small CPU training run, the registry, the gate, the
CLI, the ``training`` queue on real Redis consumed by a real training worker process, and the lock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from bench.stack import poll_until
from bench.stack import stilltag as run_stilltag
from demo.synthetic import VOCAB, make_pictures
from shared import parity, registry
from shared.config import get_settings
from shared.constants import RETRAIN_LOCK_KEY, TAG_TASK, TAGGING_QUEUE, TRAINING_QUEUE
from shared.db import model_versions, transaction
from shared.errors import UserError
from shared.registry import sha256_file
from shared.runtime import Runtime
from tests.learners import seed_website

pytestmark = pytest.mark.integration

N_IMAGES = 120
SMALL_RUN = {  # a CI-sized run: resnet18 from scratch at 32 px, one epoch per phase
    "train_arch": "resnet18", "train_pretrained": False, "train_image_size": 32, "train_batch_size": 16,
    "train_epochs_frozen": 1, "train_epochs_unfrozen": 1, "holdout_pct": 20, "train_min_tag_images": 3,
}
REPORT_FILES = ["index.html", "metrics.png", "lr_find.png", "losses.png", "per_tag.png", "pr_curves.png", "history.json"]
WORKER_WAIT_S = 240
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def env_for(settings) -> dict[str, str]:
    names = ["data_dir", "database_url", "broker_url", *SMALL_RUN]
    return {f"STILLTAG_{n.upper()}": str(getattr(settings, n)) for n in names}


@pytest.fixture
def cli(monkeypatch):
    """``cli(settings, *args)``: run ``stilltag ARGS`` in-process with ``settings`` as its environment."""
    from stilltag.cli import app

    def run(settings, *args):
        for name, value in env_for(settings).items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(app, list(args), catch_exceptions=False)
        finally:
            get_settings.cache_clear()

    yield run
    get_settings.cache_clear()


def record(settings, version: str):
    rt = Runtime(settings)
    try:
        with rt.sessions() as session:
            return registry.get_version(session=session, version=version)
    finally:
        rt.close()


def versions(settings) -> list[str]:
    rt = Runtime(settings)
    try:
        with rt.sessions() as session:
            return [v.version for v in registry.list_versions(session=session)]
    finally:
        rt.close()


def check_trained_version(settings, version: str) -> None:
    """The registry record and the store hold everything the issue lists."""
    v = record(settings, version)
    store = Runtime(settings).model_store
    assert v.sha256 == sha256_file(Path(store.location(f"{version}/export.pkl")))
    assert v.arch == "resnet18"
    assert v.vocab == sorted(VOCAB)
    assert v.dataset_size == N_IMAGES and v.snapshot_at is not None
    assert 0.0 <= v.metrics["f2"] <= 1.0 and v.metrics["threshold"] == 0.2
    assert 0.0 <= v.metrics["f2_per_tag_thresholds"] <= 1.0
    assert set(registry.tag_thresholds(v)) == set(VOCAB)
    assert all(0.05 <= t <= 0.8 for t in registry.tag_thresholds(v).values())
    assert v.metrics["thresholds_rule"]["split"] == "valid"
    assert set(v.metrics["per_tag"]) == set(VOCAB)
    assert {"precision", "recall", "f2", "support"} <= set(v.metrics["per_tag"]["circle"])
    assert [e["phase"] for e in v.metrics["epochs"]] == ["frozen", "unfrozen"]
    # bf16 and fp16 against fp32 on the validation and holdout pictures: what a worker's "auto" reads.
    assert set(v.metrics["precision_parity"]) == {"bf16", "fp16"}
    measured = min(v.metrics["valid_size"] + v.metrics["holdout_size"], settings.train_parity_images)
    for reduced, fig in v.metrics["precision_parity"].items():
        assert (fig["images"], fig["decisions"], fig["device"]) == (measured, measured * len(VOCAB), "cpu"), reduced
        assert 0 < fig["max_diff"] <= 0.05 and fig["p99_diff"] <= fig["max_diff"], reduced
        assert fig["within_limits"] == parity.within_limits(fig), reduced
    for name in REPORT_FILES:
        path = Path(store.location(f"{version}/report/{name}"))
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
    history = json.loads(Path(store.location(f"{version}/report/history.json")).read_text())
    for reduced, fig in v.metrics["precision_parity"].items():
        assert history["summary"][f"{reduced} against fp32"].startswith(f"{parity.describe(fig)} on {measured} images: ")


def check_learner_loads(settings, version: str) -> None:
    """The artifact is what the tagging worker loads: sha-checked, unpickled, Normalize inside."""
    from fastai.learner import load_learner
    from fastai.vision.all import Normalize, PILImage

    rt = Runtime(settings)
    try:
        with rt.sessions() as session:
            path = registry.fetch_artifact(store=rt.model_store, cache_dir=rt.model_cache_dir,
                                           record=registry.get_version(session=session, version=version))
    finally:
        rt.close()
    with warnings.catch_warnings():
        # fetch_artifact has checked the sha256 against the registry: this pickle is ours.
        warnings.filterwarnings("ignore", "load_learner` uses Python's insecure pickle", UserWarning)
        learn = load_learner(path, cpu=True)
    assert list(learn.dls.vocab) == sorted(VOCAB)
    assert any(isinstance(t, Normalize) for t in learn.dls.after_batch)
    pic = make_pictures([9999], size=(64, 64))[0]
    probs, _ = learn.get_preds(dl=learn.dls.test_dl([PILImage.create(pic.jpeg())]))
    assert probs.shape == (1, len(VOCAB))


def start_training_worker(settings, log_path: Path) -> subprocess.Popen:
    code = ("from shared.config import load_settings; from training.service import run_training_worker; "
            "raise SystemExit(run_training_worker(load_settings(), 'INFO'))")
    # One torch thread, as the retrain-runs tests' workers: spinning OpenMP threads on a busy 2-core machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | env_for(settings) | {
        "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)


def stilltag(settings, *args) -> subprocess.CompletedProcess:
    """``stilltag ARGS`` in its own process, as an admin runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | env_for(settings)
    return run_stilltag(env, *args, check=False, timeout_s=120)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout_s: float, what: str, log_path: Path):
    return poll_until(predicate, timeout_s, what, interval_s=0.5,
                      detail=lambda: log_path.read_text(errors="replace")[-4000:] if log_path.exists() else "")


@pytest.mark.timeout(900)  # two training runs; on a busy 2-core machine each can take minutes
def test_retrain_queue_gate_promote_rollback(make_settings, pg_url, redis_url, cli, tmp_path):
    import redis

    settings = make_settings(database_url=pg_url, broker_url=redis_url, **SMALL_RUN)
    seed_website(settings, N_IMAGES)

    # 1. `stilltag train --now`: the first model becomes champion.
    result = cli(settings, "train", "--now")
    assert result.exit_code == 0, result.output
    assert "v1 — champion" in result.output and "first model" in result.output
    assert "report/index.html" in result.output
    check_trained_version(settings, "v1")
    check_learner_loads(settings, "v1")
    show = cli(settings, "models", "show", "v1")
    assert show.exit_code == 0 and "holdout:  F2" in show.output and "report/index.html" in show.output
    assert "with per-tag thresholds" in show.output and "thresholds per tag" in show.output
    for reduced, fig in record(settings, "v1").metrics["precision_parity"].items():
        verdict = "may" if fig["within_limits"] else "may not"
        assert f"  {reduced}:     {parity.describe(fig)} on {fig['images']} images against fp32: {verdict} be served " \
               f"in {reduced}" in show.output, show.output
    assert all(re.search(rf"^\s+{tag}\s+0\.\d{{3}}", show.output, re.M) for tag in VOCAB), show.output

    # 2. A champion's recorded F2 is not what the gate compares with: make it unbeatable on record.
    rt = Runtime(settings)
    v1 = record(settings, "v1")
    with transaction(rt.sessions) as session:
        session.execute(sa.update(model_versions).where(model_versions.c.version == "v1")
                        .values(metrics={**v1.metrics, "f2": 1.0}))
    rt.close()

    # 3. `stilltag train` enqueues on `training`; a tagging message waits on `tagging` beside it.
    client = redis.Redis.from_url(redis_url)
    result = cli(settings, "train", "--epochs-unfrozen", "1")
    assert result.exit_code == 0 and "enqueued retrain" in result.output, result.output
    assert client.llen(TRAINING_QUEUE) == 1
    from shared.celery_app import create_app

    celery = create_app(settings)
    celery.send_task(TAG_TASK, args=[1], queue=TAGGING_QUEUE)
    celery.close()
    assert client.llen(TAGGING_QUEUE) == 1

    log_path = tmp_path / "training-worker.log"
    worker = start_training_worker(settings, log_path)
    try:
        # 4. While the worker trains, a second retrain is refused with a clear message.
        wait_for(lambda: client.exists(RETRAIN_LOCK_KEY), WORKER_WAIT_S, "the worker to take the retrain lock", log_path)
        refused = cli(settings, "train", "--now")
        assert refused.exit_code == 1 and "another retrain is running" in refused.output, refused.output
        wait_for(lambda: "v2" in versions(settings) and not client.exists(RETRAIN_LOCK_KEY), WORKER_WAIT_S,
                 "the worker to register v2", log_path)
    finally:
        stop(worker)
    log = log_path.read_text(errors="replace")
    assert re.search(r"registered v2 as (candidate|champion)", log), log[-4000:]
    assert "training." in log and "@%h" not in log  # a node name per process, host expanded
    assert client.llen(TAGGING_QUEUE) == 1, "the training worker must never consume the tagging queue"
    assert client.llen(TRAINING_QUEUE) == 0
    client.close()

    # The gate scored v1 again on the same holdout pictures (not its recorded 1.0) and decided on that.
    v2 = record(settings, "v2")
    gate = v2.metrics["gate"]
    assert gate["champion"] == "v1" and gate["n_images"] == v1.metrics["holdout_size"] and gate["mode"] == "global"
    assert gate["champion_f2"] < 1.0 and gate["diff_low"] <= gate["new_f2"] - gate["champion_f2"] <= gate["diff_high"]
    assert "v1 1.0000" not in v2.reason and f"champion v1 {gate['champion_f2']:.4f}" in v2.reason
    assert (v2.status == "champion") is (gate["new_f2"] >= gate["champion_f2"])
    check_trained_version(settings, "v2")
    if v2.status == "champion":  # back to v1 as champion, so the override below starts from a candidate v2
        assert stilltag(settings, "models", "rollback").returncode == 0

    # 5. An admin overrides the gate, then rolls back.
    promoted = stilltag(settings, "models", "promote", "v2")
    assert promoted.returncode == 0 and "v2 is the champion" in promoted.stdout, promoted.stderr
    assert record(settings, "v2").status == "champion" and record(settings, "v1").status == "retired"
    rolled = stilltag(settings, "models", "rollback")
    assert rolled.returncode == 0 and "v1 is the champion again" in rolled.stdout, rolled.stderr
    assert record(settings, "v1").status == "champion" and record(settings, "v2").status == "rolled_back"
    listing = stilltag(settings, "models", "list").stdout
    assert "v1" in listing and "v2" in listing


@pytest.mark.timeout(600)
def test_retrain_with_no_server(make_settings, cli, monkeypatch):
    """The embedded default: SQLite, local folders, the file-system broker and a file lock; here
    without the bf16 measure (STILLTAG_TRAIN_PARITY_IMAGES=0)."""
    settings = make_settings(**{**SMALL_RUN, "train_epochs_frozen": 0})
    seed_website(settings, N_IMAGES)
    monkeypatch.setenv("STILLTAG_TRAIN_PARITY_IMAGES", "0")
    result = cli(settings, "train", "--now", "--epochs-frozen", "0")
    assert result.exit_code == 0, result.output
    v1 = record(settings, "v1")
    assert v1.status == "champion" and [e["phase"] for e in v1.metrics["epochs"]] == ["unfrozen"]
    assert "precision_parity" not in v1.metrics  # a tagging worker's auto serves it in fp32
    show = cli(settings, "models", "show", "v1")
    for reduced in ("bf16", "fp16"):
        assert f"  {reduced}:     not measured: not served in {reduced} under auto" in show.output, show.output
    assert Path(Runtime(settings).model_store.location("v1/report/index.html")).is_file()

    # Measured afterwards, as for a version registered by hand: refused while the measure is off,
    # then on the website's validation and holdout pictures.
    with pytest.raises(UserError, match="STILLTAG_TRAIN_PARITY_IMAGES is 0"):
        cli(settings, "models", "measure", "v1")
    monkeypatch.setenv("STILLTAG_TRAIN_PARITY_IMAGES", "20")
    measured = cli(settings, "models", "measure", "v1")
    assert measured.exit_code == 0, measured.output
    v1 = record(settings, "v1")
    assert set(v1.metrics["precision_parity"]) == {"bf16", "fp16"}
    for reduced, fig in v1.metrics["precision_parity"].items():
        assert (fig["images"], fig["decisions"], fig["device"]) == (20, 20 * len(v1.vocab), "cpu"), reduced
        assert 0 < fig["max_diff"] <= 0.05 and fig["within_limits"] == parity.within_limits(fig), reduced
        assert f"  {reduced}:     {parity.describe(fig)} on 20 images against fp32" in measured.output, measured.output
    assert v1.metrics["epochs"] and v1.status == "champion"  # the rest of the record is kept


def test_a_retrain_while_another_holds_the_redis_lock_is_skipped(make_settings, redis_url, cli):
    import redis

    from training import service
    from training.lock import RetrainBusy, redis_lock

    settings = make_settings(broker_url=redis_url, **SMALL_RUN)
    client = redis.Redis.from_url(redis_url)
    with redis_lock(redis_url) as holder:
        assert client.get(RETRAIN_LOCK_KEY).decode() == holder
        assert 0 < client.ttl(RETRAIN_LOCK_KEY) <= 600  # a dead holder's lock expires
        with pytest.raises(RetrainBusy, match=re.escape(f"another retrain is running ({holder}")):
            service.retrain(settings)
        service._worker_settings = settings
        try:
            assert service.retrain_from_task().startswith("skipped: another retrain is running")
        finally:
            service._worker_settings = None
        refused = cli(settings, "train", "--now")
        assert refused.exit_code == 1 and "not started" in refused.output
    assert not client.exists(RETRAIN_LOCK_KEY)
    client.close()


def test_unknown_retrain_options_are_refused(make_settings):
    from shared.errors import SettingsError
    from training.service import with_overrides

    with pytest.raises(SettingsError, match=r"unknown retrain option.*database_url"):
        with_overrides(make_settings(), {"database_url": "sqlite://"})
    assert with_overrides(make_settings(), {"train_arch": "resnet34"}).train_arch == "resnet34"
