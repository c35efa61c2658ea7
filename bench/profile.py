"""Where a tagging worker's CPU time goes: ``stilltag bench --profile DIR``.

Two views of one worker process over the end-to-end rounds:

* **per thread, exact** — each thread's CPU seconds from ``/proc/PID/task/TID/stat``, summed over
  the end-to-end phases. torch's OpenMP threads are native threads that py-spy cannot see; here they are
  counted, as ``torch intra-op (native)``;
* **per stage, sampled** — py-spy samples (100 Hz, ``--nonblocking``) of the Python threads it
  saw active, each sample put in a stage by the frames on its stack (``STAGES``). "Active" is
  py-spy's guess: a thread runnable but waiting for a core (a niced decode thread), or blocked in
  some socket calls, counts too, so these seconds are presence, not CPU; the CPU is the first
  view. A second py-spy records only the thread holding the GIL (``--gil``): who the others wait for.

The raw samples stay in DIR (``pyspy.txt``, ``pyspy-gil.txt``, collapsed stacks for any
flame-graph tool) with ``profile.json``, the summary printed at the end of the run.

    uv run stilltag bench --rounds 3 --no-parity --profile prof/
    uv run python -m bench.profile prof/pyspy.txt        # the stage table of a raw file again
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SAMPLE_HZ = 100
# (stage, markers): a sample belongs to the first stage with a marker among its frames.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode", ("decode_image (", "_decode_on_cpu (")),
    ("fetch (image store)", ("stores.py", "fetch (")),
    ("forward pass", ("forward (worker/model.py", "_run (worker/model.py", "predict (worker/model.py")),
    ("input to tensor", ("stage (worker/model.py", "to_input (", "stack (", "_normalise (")),
    ("commit (database)", ("persist_batch (", "(shared/db.py", "sqlalchemy/")),
    ("events (Redis)", ("publish_events (",)),
    ("acks and polling (broker)", ("drain_events (", "_settle (", "_ack_done (", "kombu", "redis/")),
    ("message handling", ("on_message (", "parse_message (")),
    ("metrics and health", ("prometheus_client", "serve_forever (", "health.py")),
)


def thread_group(name: str) -> str:
    """A py-spy thread name → the worker's thread it belongs to (the pool's are numbered)."""
    for prefix, group in (("prepare", "prepare (fetch + decode pool)"), ("inference", "inference"),
                          ("forward", "forward (CPU sub-batches)"), ("batch-consumer", "batch-consumer"),
                          ("stage", "stage (GPU copy)")):
        if name.startswith(prefix):
            return group
    return name or "?"


def stage_of(frames: str) -> str:
    for stage, markers in STAGES:
        if any(m in frames for m in markers):
            return stage
    return "other"


def read_raw(path: Path) -> tuple[dict[tuple[str, str], int], dict[int, str]]:
    """py-spy ``--threads --format raw`` → samples by (thread group, stage), and thread id → group."""
    samples: Counter[tuple[str, str]] = Counter()
    tids: dict[int, str] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.startswith("thread (") or not count.isdigit():
            continue
        head, _, frames = stack.partition(";")  # "thread (TID): NAME" then the frames, root first
        tid_text, _, name = head.partition("): ")
        group = thread_group(name.split(";")[0])
        samples[(group, stage_of(frames))] += int(count)
        if tid_text[len("thread ("):].isdigit():
            tids[int(tid_text[len("thread ("):])] = group
    return dict(samples), tids


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid`` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


class Profile:
    """py-spy on ``pid`` from ``start()`` to ``stop()``, and its threads' CPU clocks over the calls
    wrapped by ``timed`` (the end-to-end phases: the worker idles through the others)."""

    def __init__(self, pid: int, folder: Path):
        self.pid, self.folder = pid, folder
        self.spies: list[subprocess.Popen] = []
        self.cpu: defaultdict[int, float] = defaultdict(float)
        self.wall_s = 0.0

    def start(self) -> Profile:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, extra in (("pyspy.txt", []), ("pyspy-gil.txt", ["--gil"])):
            with open(self.folder / f"{name}.log", "w") as log:
                self.spies.append(subprocess.Popen(
                    [exe, "record", "-p", str(self.pid), "-r", str(SAMPLE_HZ), "--threads", "--nonblocking",
                     "--format", "raw", "-o", str(self.folder / name), *extra],
                    stdout=subprocess.DEVNULL, stderr=log))
        return self

    def timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        def call() -> T:
            before, t0 = thread_cpu(self.pid), _uptime()
            try:
                return fn()
            finally:
                self.wall_s += _uptime() - t0
                for tid, seconds in thread_cpu(self.pid).items():
                    self.cpu[tid] += seconds - before.get(tid, 0.0)
        return call

    def stop(self) -> dict:
        for spy in self.spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in self.spies:
            spy.wait(timeout=60)
        samples, tids = read_raw(self.folder / "pyspy.txt")
        gil, _ = read_raw(self.folder / "pyspy-gil.txt")
        threads: defaultdict[str, float] = defaultdict(float)
        for tid, seconds in self.cpu.items():
            threads[tids.get(tid, "torch intra-op (native)")] += seconds
        summary = summarise(samples, gil, dict(threads), wall_s=self.wall_s)
        (self.folder / "profile.json").write_text(json.dumps(summary, indent=2))
        return summary


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def summarise(samples: dict[tuple[str, str], int], gil: dict[tuple[str, str], int], threads: dict[str, float],
              *, wall_s: float, cores: int | None = None) -> dict:
    """Seconds per thread (exact), and per stage: sampled running seconds and GIL-holding seconds."""
    stages: defaultdict[str, dict[str, float]] = defaultdict(lambda: {"running_s": 0.0, "gil_s": 0.0})
    for (group, stage), n in samples.items():
        stages[f"{group}: {stage}"]["running_s"] += n / SAMPLE_HZ
    for (group, stage), n in gil.items():
        stages[f"{group}: {stage}"]["gil_s"] += n / SAMPLE_HZ
    return {
        "wall_s": round(wall_s, 1),
        "cores": cores or os.cpu_count(),
        "cpu_s_by_thread": {k: round(v, 1) for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.05},
        "stages": {k: {m: round(v, 1) for m, v in s.items()}
                   for k, s in sorted(stages.items(), key=lambda kv: -kv[1]["running_s"])},
    }


def render(summary: dict) -> str:
    wall, cores = summary["wall_s"], summary["cores"]
    lines = [f"worker profile over {wall:.0f} s wall ({cores} cores = {wall * cores:.0f} CPU s available)",
             "", "CPU seconds by thread (from /proc):"]
    total = sum(summary["cpu_s_by_thread"].values())
    for name, s in summary["cpu_s_by_thread"].items():
        lines.append(f"  {s:8.1f}  {100 * s / (wall * cores):5.1f}% of the cores  {name}")
    lines.append(f"  {total:8.1f}  {100 * total / (wall * cores):5.1f}% of the cores  all threads")
    lines += ["", "Python threads by stage (py-spy samples): seen active s, holding the GIL s:"]
    for name, s in summary["stages"].items():
        if s["running_s"] >= 0.1 or s["gil_s"] >= 0.1:
            lines.append(f"  {s['running_s']:8.1f}  {s['gil_s']:8.1f}  {name}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    samples, _ = read_raw(Path(argv[0]))
    for (group, stage), n in sorted(samples.items(), key=lambda kv: -kv[1]):
        print(f"{n / SAMPLE_HZ:8.1f} s  {group}: {stage}")


if __name__ == "__main__":
    main(sys.argv[1:])
