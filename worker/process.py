"""A tagging (or training) worker as a child process: start it, wait until it is ready, stop it.

Used by the demo, the benchmark and the end-to-end tests, which all run the real
``stilltag worker`` command in its own process. Each gets a free port for its health server,
and "ready" is the worker's own ``/readyz`` answering 200, not a line in its log.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

START_TIMEOUT_S = 300  # importing torch + fastai and loading the learner on a busy machine
STOP_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 2.0


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port: int, path: str) -> tuple[int, str]:
    """``(HTTP status, body)`` of a health endpoint; ``(0, reason)`` when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=PROBE_TIMEOUT_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, *, queues: str = "tagging,backfill",
                 metrics_port: int | None = None, name: str = ""):
        self.metrics_port = metrics_port or free_port()
        self.env = {**env, "STILLTAG_METRICS_PORT": str(self.metrics_port)}
        self.log_path = log_path
        self.queues = queues
        self.name = name
        self.proc: subprocess.Popen | None = None  # None until start()
        self._log: IO[str] | None = None

    def start(self) -> WorkerProcess:
        self._log = log = open(self.log_path, "w")
        args = [sys.executable, "-m", "stilltag.cli", "worker", "--queues", self.queues]
        if self.name:
            args += ["--hostname", self.name]
        self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def probe(self, path: str) -> tuple[int, str]:
        return probe(self.metrics_port, path)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on this worker's ``/metrics`` (0 when absent)."""
        status, text = self.probe("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics of {self.log_path.name}: {status} {text}")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def model_info(self) -> dict[str, str] | None:
        """The labels of this worker's ``stilltag_model_info`` (version, arch, device, precision), or
        None before a model is loaded."""
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.probe("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics of {self.log_path.name}: {status} {text}")
        for family in text_string_to_metric_families(text):
            if family.name == "stilltag_model_info":
                return next((dict(s.labels) for s in family.samples if s.value == 1), None)
        return None

    def _started(self) -> subprocess.Popen:
        if self.proc is None:
            raise RuntimeError(f"{self.log_path.name}: the worker was never started")
        return self.proc

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> WorkerProcess:
        """Until the worker's ``/readyz`` answers 200; raises with its log if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        proc = self._started()
        while self.probe("/readyz")[0] != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}; its log "
                                   f"({self.log_path}) ends:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the worker was not ready within {timeout_s} s; its log "
                                   f"({self.log_path}) ends:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the worker finishes the batch in hand), SIGKILL if it does not stop in time.
        Also closes the log of a worker that exited by itself; calling it twice is harmless."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc = self._started()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if self._log is not None:
            self._log.close()
