"""Private servers for fault drills: a Redis and a PostgreSQL of the test's own, on free ports, that
the test may SIGKILL, stop and restart (the machine's own servers are never touched), and a TCP
proxy that cuts every connection through it. Also the Redis server of one lane of ``pytest -n N``
(:class:`LaneRedis`, tests/conftest.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from glob import glob
from pathlib import Path

from bench.stack import free_port, poll_until

START_TIMEOUT_S = 30


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateRedis:
    """``redis-server`` with an append-only file and ``noeviction``, as production runs it."""

    def __init__(self, folder: Path, *args: str):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = args  # more redis-server options

    @property
    def pid(self) -> int:
        return int((self.folder / "redis.pid").read_text())

    def start(self) -> PrivateRedis:
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction", "--dir", str(self.folder),
             "--daemonize", "yes", "--pidfile", str(self.folder / "redis.pid"),
             "--logfile", str(self.folder / "redis.log"), *self.args],
            check=True,
        )
        poll_until(self.answers, START_TIMEOUT_S, f"Redis on {self.port} answers", interval_s=0.05)
        return self

    def answers(self) -> bool:
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return client.ping()
        except Exception:  # down, or still loading its append-only file
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: not accepts(self.port), START_TIMEOUT_S, "Redis dies", interval_s=0.05)
        (self.folder / "redis.pid").unlink(missing_ok=True)

    def stop(self) -> None:
        if (self.folder / "redis.pid").exists():
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)
            poll_until(lambda: not accepts(self.port), START_TIMEOUT_S, "Redis stops", interval_s=0.05)


class LaneRedis:
    """A ``redis-server`` that keeps nothing on disk, as the machine's own, for the tests of one
    lane of ``pytest -n N``. It runs as a child of the test process and gets SIGKILL when that
    process ends, however it ends (util-linux's ``setpriv --pdeathsig``)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="stilltag-lane-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
        )
        poll_until(self._answers, START_TIMEOUT_S, f"a lane's Redis on {self.port} answers", interval_s=0.02,
                   detail=self._log)

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server for a test lane exited with {self.process.returncode}:\n{self._log()}")
        return accepts(self.port)

    def _log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (``initdb`` + ``pg_ctl``), run as the ``postgres`` user
    when the test runs as root (PostgreSQL refuses root)."""

    def __init__(self):
        bins = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins and not shutil.which("initdb"):
            raise RuntimeError("PostgreSQL's initdb is not installed (Debian: postgresql)")
        self.bin = Path(bins[-1]).parent if bins else Path(shutil.which("initdb")).parent
        # Its own folder in the system's temporary folder, which the postgres user can reach
        # (pytest's folders are private to the user running the tests).
        self.folder = Path(tempfile.mkdtemp(prefix="stilltag-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True)

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            if os.geteuid() == 0:
                user = pwd.getpwnam("postgres")
                os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; ``cut()`` drops every connection through it
    and refuses new ones until ``restore()``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._down = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            with self._lock:
                self._sockets.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self) -> None:
        self._down.set()
        with self._lock:
            socks = list(self._sockets)
        self._drop(*socks)

    def restore(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
