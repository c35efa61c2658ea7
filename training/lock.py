"""One retrain at a time: a Redis lock when the broker is Redis, an fcntl file lock otherwise.

The Redis lock expires unless renewed, and a thread renews it while the retrain runs, so a
training worker that dies frees it within ``LOCK_TTL_S``. The file lock is released by the
kernel when its process exits, however it exits. Both hold the holder's ``host pid N since …``
while held (``lock_holder`` reads it without taking the lock).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.config import Settings
from shared.constants import RETRAIN_LOCK_FILE, RETRAIN_LOCK_KEY

log = logging.getLogger(__name__)

LOCK_TTL_S = 120  # a dead holder's Redis lock frees itself after 2 minutes (renewed every 24 s while held)


class RetrainBusy(RuntimeError):
    """Another retrain holds the lock; this one does not start."""


def _holder() -> str:
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return f"{socket.gethostname()} pid {os.getpid()} since {started} ({uuid.uuid4().hex[:8]})"


@contextmanager
def redis_lock(url: str, *, key: str = RETRAIN_LOCK_KEY, ttl_s: float = LOCK_TTL_S) -> Iterator[str]:
    import redis
    from redis.exceptions import LockError

    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    token = _holder()
    lock = client.lock(key, timeout=ttl_s, thread_local=False)
    try:
        if not lock.acquire(blocking=False, token=token):
            holder: bytes | None = client.get(key)  # type: ignore[assignment]  # a client made without decode_responses
            raise RetrainBusy(
                f"another retrain is running ({holder.decode() if holder else 'holder unknown'}; Redis key {key}); "
                "this one was not started. Wait for it to finish, or delete the key if its worker is gone."
            )
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(ttl_s / 5):  # five chances to renew before it expires
                try:
                    lock.reacquire()
                    continue
                except LockError:
                    pass  # expired while Redis was out of reach, or lost with a Redis restart
                except Exception:  # Redis briefly away: try again on the next tick
                    log.warning("could not renew the retrain lock %s", key, exc_info=True)
                    continue
                try:  # take it again, so that no other retrain starts and this run still shows its holder
                    if lock.acquire(blocking=False, token=token):
                        log.warning("the retrain lock %s had expired (Redis out of reach?); taken again", key)
                        continue
                    other: bytes | None = client.get(key)  # type: ignore[assignment]
                except Exception:
                    log.warning("could not take the expired retrain lock %s again", key, exc_info=True)
                    continue
                log.error("the retrain lock %s was lost to %s; two retrains run at once", key,
                          other.decode() if other else "another retrain")
                return

        renewer = threading.Thread(target=renew, name="retrain-lock", daemon=True)
        renewer.start()
        try:
            yield token
        finally:
            stop.set()
            renewer.join()
            try:
                lock.release()
            except LockError:
                log.warning("the retrain lock %s had already expired when the retrain ended", key)
    finally:
        client.close()


@contextmanager
def file_lock(path) -> Iterator[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "holder unknown"
            raise RetrainBusy(
                f"another retrain is running ({holder}; lock file {path}); this one was not started. "
                "Wait for it to finish."
            ) from None
        token = _holder()
        fh.seek(0)
        fh.truncate()
        fh.write(token + "\n")
        fh.flush()
        try:
            yield token
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_holder(settings: Settings) -> str | None:
    """Who holds the retrain lock (``host pid N since …``), without taking it; None when nobody does.

    The Redis key is the truth. The lock file keeps the last holder's line after a SIGKILL (the
    kernel frees the lock, not the line), so the line counts only while the kernel says someone
    holds the file (Linux's ``/proc/locks``); where that cannot be read, the caller checks the line's
    host and pid (``training.runs.holder_gone``).
    """
    if settings.broker_is_redis:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=10)
        try:
            holder: bytes | None = client.get(RETRAIN_LOCK_KEY)  # type: ignore[assignment]
        finally:
            client.close()
        return holder.decode(errors="replace") if holder else None
    path = settings.data_dir / RETRAIN_LOCK_FILE
    try:
        line = path.read_text(encoding="utf-8", errors="replace").strip()
        held = _flocked(path.stat().st_ino)
    except FileNotFoundError:
        return None
    if held is False:
        return None  # the kernel freed the lock: the line is a dead holder's
    return line or None


def _flocked(inode: int) -> bool | None:
    """Whether some process holds an flock on the file with this inode, from ``/proc/locks``
    (which lists every lock the kernel holds, and takes none); None where it cannot be read."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146769 0 EOF"; a waiter's line has "->" after the id.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


@contextmanager
def retrain_lock(settings: Settings) -> Iterator[str]:
    """Hold the retrain lock for the block.

    Raises:
        RetrainBusy: another retrain holds it.
    """
    if settings.broker_is_redis:
        with redis_lock(settings.broker_url) as token:
            yield token
    else:
        with file_lock(settings.data_dir / RETRAIN_LOCK_FILE) as token:
            yield token
