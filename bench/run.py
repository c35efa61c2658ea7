"""``stilltag bench``: the tagging worker against per-image predict and against the model's limit.

Measured in one process tree on one machine with one exported learner (README, "Benchmarks"):

* baseline — the seed project's way, a loop of ``learn.predict(image)``;
* fastai batched — ``learn.get_preds(dl=learn.dls.test_dl(images))``;
* limit — ``TaggingModel.forward`` on a tensor already in memory, at ``max_batch``, with the
  worker's own settings: what no pipeline can beat;
* end to end — messages LPUSHed to Redis, a real ``stilltag worker`` process, timed until every
  image's ``stilltag:tagged`` event (sent after commit) has arrived;
* latency — enqueue → commit for a trickle of uploads, and for one upload behind a burst of backfill.

Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

TRICKLE_INTERVAL_MS = 200  # one upload every 200 ms
LIMIT_MIN_S = 8.0  # the forward-pass loop runs at least this long (quick: 1 s)
EVENT_TIMEOUT_S = 1800  # a whole run on a slow machine; only a hung worker reaches it


@dataclass(frozen=True)
class Plan:
    arch: str
    device: str
    size: int  # square model input, px
    images: int  # end-to-end and fastai-batched images
    baseline_images: int
    max_batch: int
    max_wait_ms: int
    trickle: int  # uploads in the trickle
    backfill: int  # backfill messages in the burst ahead of one upload
    distinct_per_size: int
    limit_min_s: float


def make_plan(*, arch: str, images: int, quick: bool, max_batch: int, max_wait_ms: int, device: str) -> Plan:
    from worker.model import resolve_device

    device = resolve_device(device)
    gpu = device.startswith("cuda")
    arch = arch or ("resnet152" if gpu else "resnet18")
    if quick:  # proves the benchmark works (CI); the numbers mean little
        return Plan(arch, device, 64, images or 16, min(images or 16, 8), max_batch or 8, max_wait_ms, 5,
                    2 * (max_batch or 8), 1, 1.0)
    max_batch = max_batch or 64
    images = images or (1024 if gpu else 256)
    return Plan(arch, device, 224, images, min(images, 128 if gpu else 64), max_batch, max_wait_ms,
                100 if gpu else 50, 4 * max_batch, 8, LIMIT_MIN_S)


# --- the learner ----------------------------------------------------------------------------
def export_learner(folder: Path, *, arch: str, size: int) -> Path:
    """An untrained learner shaped like the seed model (squish to ``size``, ImageNet stats), exported."""
    import pandas as pd
    import torchvision
    from fastai.vision.all import (
        ColReader,
        DataBlock,
        ImageBlock,
        MultiCategoryBlock,
        Normalize,
        RandomSplitter,
        Resize,
        imagenet_stats,
        vision_learner,
    )

    from demo.synthetic import VOCAB, make_pictures

    arch_fn = getattr(torchvision.models, arch, None)
    if arch_fn is None:
        raise typer.BadParameter(f"{arch!r} is not a torchvision model (e.g. resnet18, resnet152)", param_hint="--arch")
    rows = []
    (folder / "train").mkdir(parents=True, exist_ok=True)
    for pic in make_pictures(range(1, 9)):
        path = folder / "train" / f"{pic.image_id}.jpg"
        pic.image.save(path)
        rows.append({"path": str(path), "tags": " ".join(pic.tags)})
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=list(VOCAB))), get_x=ColReader("path"),
        get_y=ColReader("tags", label_delim=" "), splitter=RandomSplitter(valid_pct=0.25, seed=0),
        item_tfms=Resize(size, method="squish"), batch_tfms=Normalize.from_stats(*imagenet_stats),
    )
    dls = block.dataloaders(pd.DataFrame(rows), bs=8, num_workers=0)
    learn = vision_learner(dls, arch_fn, pretrained=False)
    learn.path = folder
    learn.export("export.pkl")
    return folder / "export.pkl"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --- in-process measures --------------------------------------------------------------------
def load_fastai(learner: Path, device: str):
    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_learner warns that unpickling is unsafe: it is our own file
        return load_learner(learner, cpu=device == "cpu")


def measure_fastai(plan: Plan, learn, paths: list[Path]) -> dict[str, float]:
    """baseline (a loop of ``learn.predict``) and fastai batched (``get_preds`` on a test DataLoader)."""
    out: dict[str, float] = {}
    with learn.no_bar(), learn.no_logging():
        learn.predict(paths[0])  # warm-up
        t0 = time.perf_counter()
        for p in paths[: plan.baseline_images]:
            learn.predict(p)
        out["baseline_img_s"] = plan.baseline_images / (time.perf_counter() - t0)

        learn.get_preds(dl=learn.dls.test_dl(paths[: plan.max_batch], bs=plan.max_batch))  # warm-up
        t0 = time.perf_counter()
        learn.get_preds(dl=learn.dls.test_dl(paths, bs=plan.max_batch))
        out["fastai_batched_img_s"] = len(paths) / (time.perf_counter() - t0)
    return out


class Limit:
    """The bare model at ``max_batch`` on an input already prepared, as the worker runs it."""

    def __init__(self, plan: Plan, learn):
        from worker.model import TaggingModel

        self.plan = plan
        self.model = TaggingModel(learn, version="bench", device=plan.device)
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (plan.max_batch, self.model.prep.height, self.model.prep.width, 3), dtype=np.uint8)
        self.x = self.model.to_input(pixels)
        self.one = self.model.to_input(pixels[:1])

    def img_s(self) -> float:
        for _ in range(2):
            self.model.forward(self.x)
        _sync(self.plan.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < self.plan.limit_min_s or n < 3:
            self.model.forward(self.x)
            _sync(self.plan.device)
            n += 1
        return n * self.plan.max_batch / (time.perf_counter() - t0)

    def single_ms(self) -> float:
        """Median of one-image forward passes, including the copy of the result back to the host."""
        times = []
        for _ in range(15):  # the first passes at a new shape are slow on CPU: leave five out
            t = time.perf_counter()
            self.model.forward(self.one).cpu()
            times.append(time.perf_counter() - t)
        return float(np.median(times[5:]) * 1000)

    def release(self) -> None:
        self.model.release()
        self.x = self.one = None
        gc.collect()


# --- end to end -----------------------------------------------------------------------------
def measure_end_to_end(plan: Plan, stack, learner: Path, ids: dict[str, list[int]]) -> dict[str, float]:
    """Throughput through Redis → worker process → database, then the two latency measures."""
    from bench.stack import poll_until
    from bench.traffic import Events

    stack.register_champion(learner)
    worker = stack.worker().wait_ready()
    events = Events(stack.broker_url)
    try:
        stack.push("tagging", ids["warmup"])  # first batches pay for lazy initialisation
        events.wait(ids["warmup"], EVENT_TIMEOUT_S)

        t0 = stack.push("backfill", ids["throughput"])
        seen = events.wait(ids["throughput"], EVENT_TIMEOUT_S)
        end = max(t for t, _ in seen.values())
        out = {"end_to_end_img_s": len(seen) / (end - t0)}
        failed = [i for i, (_, state) in seen.items() if state != "tagged"]
        if failed:
            raise RuntimeError(f"{len(failed)} image(s) failed in the worker: {failed[:10]}")
        statuses = stack.statuses()
        committed = sum(statuses.get(i, ("",))[0] == "tagged" for i in ids["throughput"])
        if committed != len(ids["throughput"]):
            raise RuntimeError(f"events for {len(seen)} images but {committed} tagged rows in the database")

        sent: dict[int, float] = {}
        start = time.perf_counter()
        for k, image_id in enumerate(ids["trickle"]):
            time.sleep(max(0.0, start + k * TRICKLE_INTERVAL_MS / 1000 - time.perf_counter()))
            sent[image_id] = stack.push("tagging", [image_id])
        seen = events.wait(ids["trickle"], EVENT_TIMEOUT_S)
        latencies = [(seen[i][0] - sent[i]) * 1000 for i in ids["trickle"]]
        out["trickle_p50_ms"] = float(np.percentile(latencies, 50))
        out["trickle_p95_ms"] = float(np.percentile(latencies, 95))

        received = worker.metric("stilltag_messages_received_total")
        stack.push("backfill", ids["backfill"])
        in_hand = min(len(ids["backfill"]), plan.max_batch)
        poll_until(lambda: worker.metric("stilltag_messages_received_total") >= received + in_hand, EVENT_TIMEOUT_S,
                   f"the worker takes {in_hand} backfill messages", interval_s=0.01)
        (upload,) = ids["upload"]
        t_upload = stack.push("tagging", [upload])
        out["behind_backfill_ms"] = (events.wait([upload], EVENT_TIMEOUT_S)[upload][0] - t_upload) * 1000
        events.wait(ids["backfill"], EVENT_TIMEOUT_S)
        return out
    finally:
        events.close()
        stack.stop_workers()


# --- report ---------------------------------------------------------------------------------
def report(plan: Plan, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base, limit, e2e = result["baseline_img_s"], result["limit_img_s"], result["end_to_end_img_s"]
    table = Table(title=f"stilltag bench — {plan.arch} at {plan.size} px on {result['device_name']}, "
                        f"max_batch {plan.max_batch}, max_wait_ms {plan.max_wait_ms}")
    table.add_column("measure")
    table.add_column("images", justify="right")
    table.add_column("img/s", justify="right")
    table.add_column("× baseline", justify="right")
    table.add_column("of limit", justify="right")
    rows = [("baseline: learn.predict loop", plan.baseline_images, base),
            ("fastai batched: get_preds(test_dl)", plan.images, result["fastai_batched_img_s"]),
            ("limit: forward at max_batch", None, limit),
            ("end to end: Redis → worker → DB", plan.images, e2e)]
    for name, n, rate in rows:
        table.add_row(name, str(n) if n else "-", f"{rate:.1f}", f"{rate / base:.2f}", f"{rate / limit:.0%}")
    Console().print(table)

    lat = Table(title="latency, enqueue → commit")
    lat.add_column("measure")
    lat.add_column("ms", justify="right")
    lat.add_column("target ms", justify="right")
    lat.add_row(f"trickle p50 ({plan.trickle} uploads, one per {TRICKLE_INTERVAL_MS} ms)", f"{result['trickle_p50_ms']:.0f}", "")
    lat.add_row("trickle p95", f"{result['trickle_p95_ms']:.0f}", f"≤ {result['trickle_p95_target_ms']:.0f}")
    lat.add_row(f"one upload behind {plan.backfill} backfill", f"{result['behind_backfill_ms']:.0f}", "")
    lat.add_row("single-image forward pass", f"{result['single_forward_ms']:.0f}", "")
    Console().print(lat)

    checks = Table(title="targets")
    checks.add_column("ratio")
    checks.add_column("value", justify="right")
    checks.add_column("target", justify="right")
    checks.add_column("met")
    for name, value, target in result["targets"]:
        checks.add_row(name, f"{value:.2f}", f"≥ {target:.2f}" if name != "trickle p95 ms" else f"≤ {target:.0f}",
                       "yes" if _met(name, value, target) else "no")
    Console().print(checks)


def _met(name: str, value: float, target: float) -> bool:
    return value <= target if name == "trickle p95 ms" else value >= target


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def run_bench(plan: Plan, *, redis_url: str, pg_admin_url: str = "") -> dict:
    from bench.stack import claimed_stack
    from bench.traffic import movie_jpegs

    with tempfile.TemporaryDirectory(prefix="stilltag-bench-") as tmp, \
            claimed_stack(Path(tmp), redis_host_url=redis_url, pg_admin_url=pg_admin_url, max_batch=plan.max_batch,
                          max_wait_ms=plan.max_wait_ms, device=plan.device) as stack:
        counts = {"warmup": plan.max_batch, "throughput": plan.images, "trickle": plan.trickle,
                  "backfill": plan.backfill, "upload": 1}
        jpegs = movie_jpegs(sum(counts.values()), distinct_per_size=plan.distinct_per_size)
        paths = {i: stack.put_image(i, data) for i, data in enumerate(jpegs, start=1)}
        ids, first = {}, 1
        for name, n in counts.items():
            ids[name] = list(range(first, first + n))
            first += n
        learner = export_learner(Path(tmp) / "learner", arch=plan.arch, size=plan.size)
        result: dict = {"arch": plan.arch, "device": plan.device, "device_name": _device_name(plan.device),
                        "image_size": plan.size, "max_batch": plan.max_batch, "max_wait_ms": plan.max_wait_ms,
                        "images": plan.images, "baseline_images": plan.baseline_images,
                        "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024}
        result["load_avg_1m"] = [os.getloadavg()[0]]
        learn = load_fastai(learner, plan.device)
        result.update(measure_fastai(plan, learn, [paths[i] for i in ids["throughput"]]))
        limit = Limit(plan, learn)
        del learn
        limits = [limit.img_s()]
        result["single_forward_ms"] = limit.single_ms()
        result.update(measure_end_to_end(plan, stack, learner, ids))
        # Again after the worker has stopped: the limit is the better of the two (other load on the
        # machine only ever lowers it), so the ratio is not flattered by a slow first measure.
        limits.append(limit.img_s())
        limit.release()
        result["limit_img_s"], result["limit_runs_img_s"] = max(limits), limits
        result["load_avg_1m"].append(os.getloadavg()[0])
    target_ms = plan.max_wait_ms + 2 * result["single_forward_ms"] + 100
    result["trickle_p95_target_ms"] = target_ms
    result["end_to_end_vs_limit"] = result["end_to_end_img_s"] / result["limit_img_s"]
    result["end_to_end_vs_baseline"] = result["end_to_end_img_s"] / result["baseline_img_s"]
    gpu = plan.device.startswith("cuda")
    result["targets"] = [("end_to_end / limit", result["end_to_end_vs_limit"], 0.80 if gpu else 0.85)]
    if not gpu:
        result["targets"] += [("end_to_end / baseline", result["end_to_end_vs_baseline"], 2.0),
                              ("trickle p95 ms", result["trickle_p95_ms"], target_ms)]
    result["plan"] = asdict(plan)
    return result


def bench(
    arch: Annotated[str, typer.Option(help="torchvision architecture; default resnet18 on CPU, resnet152 on GPU.")] = "",
    images: Annotated[int, typer.Option("--images", "-n", help="Images end to end (default 256 CPU, 1024 GPU).")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A small run that only proves the benchmark works.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results to this JSON file.")] = None,
    max_batch: Annotated[int, typer.Option(help="Images per forward pass (default 64; quick 8).")] = 0,
    max_wait_ms: Annotated[int, typer.Option(help="The worker's wait after a batch's first image.")] = 50,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    redis: Annotated[str, typer.Option(help="Redis server; an empty DB number 2-15 is claimed and flushed after.")]
    = "redis://127.0.0.1:6379",
    postgres: Annotated[str, typer.Option(help="PostgreSQL admin URL to create a throw-away database on; "
                                               "empty: SQLite in a temporary folder.")] = "",
) -> None:
    """Measure the tagging worker: per-image predict, fastai batched, the model's limit, end to end, latency."""
    plan = make_plan(arch=arch, images=images, quick=quick, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     device=device)
    result = run_bench(plan, redis_url=redis.rstrip("/"), pg_admin_url=postgres)
    report(plan, result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
