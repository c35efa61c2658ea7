"""A tagging (or training) worker as a child process: start it, wait until it consumes, stop it.

Used by the demo, the benchmark and the end-to-end tests, which all run the real
``stilltag worker`` command in its own process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

READY_LINE = "consuming "  # logged by worker/consumer.py once the worker takes messages
START_TIMEOUT_S = 300  # importing torch + fastai and loading the learner on a busy machine
STOP_TIMEOUT_S = 60


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, *, queues: str = "tagging,backfill"):
        self.env = env
        self.log_path = log_path
        self.queues = queues
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "WorkerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--queues", self.queues],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "WorkerProcess":
        """Until the worker logs that it consumes; raises with its log if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}; its log "
                                   f"({self.log_path}) ends:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the worker did not start within {timeout_s} s; its log "
                                   f"({self.log_path}) ends:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the worker finishes the batches in hand), SIGKILL if it does not stop in time.
        Also closes the log of a worker that exited by itself; calling it twice is harmless."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()
