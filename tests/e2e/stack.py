"""A real stilltag stack for end-to-end tests: PostgreSQL or SQLite, a Redis DB, an image folder,
a registered champion, and tagging workers as separate processes started with the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from shared.config import ENV_PREFIX
from shared.db import make_engine, tag_suggestions, tagging_status
from worker.process import WorkerProcess

def stilltag(env: dict[str, str], *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stilltag.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check)


@dataclass
class Stack:
    settings_env: dict[str, str]
    root: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        return {**base, **self.settings_env, "PYTHONUNBUFFERED": "1"}

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    def put_image(self, image_id: int, data: bytes) -> None:
        self.image_dir.mkdir(parents=True, exist_ok=True)
        (self.image_dir / f"{image_id}.jpg").write_bytes(data)

    def worker(self, name: str = "worker", **kw) -> WorkerProcess:
        w = WorkerProcess(self.env, self.root / f"{name}.log", **kw).start()
        self.workers.append(w)
        return w

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return stilltag(self.env, *args, **kw)

    def engine(self):
        if not hasattr(self, "_engine"):
            self._engine = make_engine(self.settings_env["STILLTAG_DATABASE_URL"])
        return self._engine

    def statuses(self) -> dict[int, tuple[str, str | None, str | None]]:
        with self.engine().connect() as c:
            rows = c.execute(sa.select(tagging_status.c.image_id, tagging_status.c.state, tagging_status.c.error,
                                       tagging_status.c.model_version))
            return {r.image_id: (r.state, r.error, r.model_version) for r in rows}

    def suggestions(self) -> list[tuple]:
        with self.engine().connect() as c:
            return c.execute(
                sa.select(tag_suggestions.c.image_id, tag_suggestions.c.tag, tag_suggestions.c.probability,
                          tag_suggestions.c.model_version)
                .order_by(tag_suggestions.c.image_id, tag_suggestions.c.tag)
            ).all()

    def wait_for(self, image_ids, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        wanted = set(image_ids)
        while True:
            got = self.statuses()
            if wanted <= set(got):
                return got
            if time.monotonic() > deadline:
                logs = "\n".join(w.log()[-3000:] for w in self.workers)
                raise AssertionError(f"not tagged after {timeout_s} s: {sorted(wanted - set(got))}\n{logs[-6000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        for w in self.workers:
            if w.proc:
                w.stop()  # also closes the log of a worker that has exited by itself
        if hasattr(self, "_engine"):
            self._engine.dispose()
