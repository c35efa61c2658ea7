"""``stilltag bench``: the tagging worker against per-image predict and against the model's limit.

Measured in one process tree on one machine with one exported learner (README, "Benchmarks"):

* baseline — the seed project's way, a loop of ``learn.predict(image)``;
* fastai batched — ``learn.get_preds(dl=learn.dls.test_dl(images))``;
* limit — ``TaggingModel.forward`` on a tensor already in memory, at ``max_batch``, with the
  worker's own settings: what no pipeline can beat;
* decode + forward — the worker's decode pool feeding that model in this process, the next batch
  decoding beside the forward pass: what end to end can reach where decoding shares the cores;
* end to end — messages LPUSHed to Redis, a real ``stilltag worker`` process, timed until every
  image's ``stilltag:tagged`` event (sent after commit) has arrived;
* latency — enqueue → commit for a trickle of uploads, and for one upload behind a burst of backfill;
* parity — each reduced precision (bf16, fp16), and the compiled model when ``--compile`` is on,
  against fp32, on a learner trained for a moment.

The rates are measured in rounds, their order rotating from round to round, so that other load on
the machine falls on every phase alike; each is reported as the median and the min–max of its rounds,
and every ratio comes from the same run. The load average is recorded at the start and the end.

Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from shared.parity import LIMITS as PARITY_LIMITS
from shared.parity import METRICS_KEY as PARITY_KEY
from shared.parity import REDUCED
from shared.parity import THRESHOLD as PARITY_THRESHOLD
from shared.parity import figures as parity_figures

BACKLOG = 10_000  # backfill messages ahead of the uploads in the full run
UPLOADS_BEHIND = 5  # uploads sent one by one behind it
TRICKLE_INTERVAL_MS = 200  # one upload every 200 ms
LIMIT_MIN_S = 8.0  # the forward-pass loop runs at least this long (quick: 1 s)
EVENT_TIMEOUT_S = 1800  # a whole run on a slow machine; only a hung worker reaches it
MIN_ROUNDS = 3
TRAIN_IMAGES = 48  # generated pictures the benchmark's learner is trained on (for parity); quick: 16


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
    backfill: int  # backfill messages queued ahead of the uploads (links to the throughput images)
    distinct_per_size: int
    limit_min_s: float
    rounds: int = MIN_ROUNDS
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16 (auto: again once the learner's bf16 parity is known)
    precision_setting: str = "auto"  # as asked: auto, fp32, bf16 or fp16
    learner: str = ""  # an exported learner to measure instead of one trained here
    compile_mode: str = "off"
    parity_images: int = 64
    # Extra end-to-end phases: (name, {STILLTAG_*: value}), each its own worker on its own Redis DB,
    # measured in the same rounds (before/after comparisons on a busy machine).
    variants: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = field(default=())


def make_plan(*, arch: str, images: int, quick: bool, max_batch: int, max_wait_ms: int, device: str,
              rounds: int = MIN_ROUNDS, precision: str = "auto", compile_mode: str = "off",
              variants: tuple = (), learner: str = "") -> Plan:
    from worker.model import resolve_device, resolve_precision

    device = resolve_device(device)
    gpu = device.startswith("cuda")
    arch = arch or ("resnet152" if gpu else "resnet18")
    common: dict[str, Any] = {"rounds": rounds, "precision": resolve_precision(precision, device)[0],
                              "precision_setting": precision, "compile_mode": compile_mode, "variants": variants,
                              "learner": learner}
    if quick:  # proves the benchmark works (CI); the numbers mean little
        return Plan(arch, device, 64, images or 16, min(images or 16, 8), max_batch or 8, max_wait_ms, 5,
                    20 * (max_batch or 8), 1, 0.5, parity_images=16, **common)
    max_batch = max_batch or 64
    images = images or (1024 if gpu else 256)
    return Plan(arch, device, 224, images, min(images, 128 if gpu else 64), max_batch, max_wait_ms,
                100 if gpu else 50, BACKLOG, 8, LIMIT_MIN_S, **common)


def parse_variant(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``name:STILLTAG_X=1,OMP_Y=2`` → ``("name", (("STILLTAG_X", "1"), ("OMP_Y", "2")))``: environment
    variables of a variant's worker."""
    name, _, spec = text.partition(":")
    pairs = [p.partition("=") for p in spec.split(",") if p]
    if not name.isidentifier() or not pairs or any(not k.isupper() or not eq for k, eq, _ in pairs):
        raise typer.BadParameter(f"{text!r}: expected NAME:VAR=VALUE[,VAR=VALUE] (e.g. "
                                 "threads1:STILLTAG_TORCH_THREADS=1,OMP_WAIT_POLICY=PASSIVE)", param_hint="--variant")
    return name, tuple((k, v) for k, _, v in pairs)


# --- the learner ----------------------------------------------------------------------------
def export_learner(folder: Path, *, arch: str, size: int, train_images: int = TRAIN_IMAGES) -> Path:
    """A learner shaped like the seed model (squish to ``size``, ImageNet stats), trained for two
    epochs on generated pictures (so its probabilities spread out, for the parity figures), exported."""
    import torchvision
    from fastai.vision.all import vision_learner

    from demo.synthetic import picture_dataloaders

    arch_fn = getattr(torchvision.models, arch, None)
    if arch_fn is None:
        raise typer.BadParameter(f"{arch!r} is not a torchvision model (e.g. resnet18, resnet152)", param_hint="--arch")
    dls = picture_dataloaders(folder / "train", range(1, max(train_images, 8) + 1), size=size, bs=8)
    learn = vision_learner(dls, arch_fn, pretrained=False)
    if train_images:
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(2, 1e-3)
    learn.path = folder
    learn.export("export.pkl")
    return folder / "export.pkl"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


# --- in-process measures --------------------------------------------------------------------
def load_fastai(learner: Path, device: str):
    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_learner warns that unpickling is unsafe: it is our own file
        return load_learner(learner, cpu=device == "cpu")


def measure_fastai(plan: Plan, learn, paths: list[Path]) -> dict[str, Callable[[], float]]:
    """baseline (a loop of ``learn.predict``) and fastai batched (``get_preds`` on a test DataLoader),
    warmed up, as phases of the rounds."""
    with learn.no_bar(), learn.no_logging():
        learn.predict(paths[0])
        learn.get_preds(dl=learn.dls.test_dl(paths[: plan.max_batch], bs=plan.max_batch))

    def baseline() -> float:
        with learn.no_bar(), learn.no_logging():
            t0 = time.perf_counter()
            for p in paths[: plan.baseline_images]:
                learn.predict(p)
            return plan.baseline_images / (time.perf_counter() - t0)

    def batched() -> float:
        with learn.no_bar(), learn.no_logging():
            t0 = time.perf_counter()
            learn.get_preds(dl=learn.dls.test_dl(paths, bs=plan.max_batch))
            return len(paths) / (time.perf_counter() - t0)

    return {"baseline_img_s": baseline, "fastai_batched_img_s": batched}


def measure_parity(plan: Plan, learn, jpegs: list[bytes]) -> dict[str, dict[str, float]]:
    """Each reduced precision against fp32 through the worker's own path, on the same pixels."""
    from worker.model import TaggingModel
    from worker.preprocess import decode_image

    def probs(model) -> np.ndarray:
        return np.concatenate([model.predict(pixels[i:i + plan.max_batch])
                               for i in range(0, len(pixels), plan.max_batch)])

    reference = TaggingModel(learn, version="fp32", device=plan.device, precision="fp32")
    pixels = np.stack([decode_image(j, reference.prep, max_pixels=10**9) for j in jpegs])
    base = probs(reference)
    out = {}
    for precision in REDUCED:
        model = TaggingModel(learn, version=precision, device=plan.device, precision=precision)
        out[precision] = parity_figures(base, probs(model))
    if plan.compile_mode != "off":  # the run's own mode: compiled, at its precision
        compiled = TaggingModel(learn, version="compiled", device=plan.device, precision=plan.precision,
                                compile_mode=plan.compile_mode, compile_batch=plan.max_batch)
        compiled.compiled.wait()
        out[compiled_key(plan)] = parity_figures(base, probs(compiled))
    return out


def compiled_key(plan: Plan) -> str:
    return f"{plan.precision}+compile"


class Limit:
    """The bare model at ``max_batch`` on an input already prepared, as the worker runs it."""

    def __init__(self, plan: Plan, learn, *, cpu_streams: int | None = None):
        from shared.config import get_settings
        from worker.model import TaggingModel

        self.plan = plan
        settings = get_settings()  # the environment the benchmark's worker is started with
        self.model = TaggingModel(learn, version="bench", device=plan.device, precision=plan.precision,
                                  compile_mode=plan.compile_mode, compile_batch=plan.max_batch,
                                  cpu_streams=settings.cpu_streams if cpu_streams is None else cpu_streams,
                                  cpu_sub_batch=settings.cpu_sub_batch)
        self.model.compiled.wait()  # the limit is the compiled model's, when it compiles
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


class DecodeAndForward:
    """The worker's own decode threads (``worker.prepare_pool.PreparePool``: as many, at the same
    niceness) feeding the limit's model, in this process: each batch's JPEGs decode while the batch
    before it is in the forward pass, as in a worker, with no broker, database or events. On a CPU
    the decodes share the forward pass's cores, so this is what end to end can reach on this
    machine; end to end / this is what the worker's consumer, broker and commits cost."""

    def __init__(self, plan: Plan, limit: Limit, jpegs: list[bytes]):
        from shared.config import get_settings
        from worker.prepare_pool import PreparePool

        self.plan, self.model, self.jpegs = plan, limit.model, jpegs
        self.settings = get_settings()  # the environment the benchmark's worker is started with
        self.pool: PreparePool[np.ndarray] = PreparePool(self.settings, fetch_ahead=False)

    def _decode(self, data: bytes) -> np.ndarray:
        from worker.service import decode

        return decode(self.settings, data, self.model.prep)

    def img_s(self) -> float:
        size = self.plan.max_batch
        batches = [self.jpegs[i:i + size] for i in range(0, len(self.jpegs), size)]
        t0 = time.perf_counter()
        futures = [self.pool.decode(partial(self._decode, data)) for data in batches[0]]
        for k in range(len(batches)):
            pixels = np.stack([f.result() for f in futures])
            if k + 1 < len(batches):  # the next batch decodes beside this one's forward pass
                futures = [self.pool.decode(partial(self._decode, data)) for data in batches[k + 1]]
            self.model.predict(pixels)
        return len(self.jpegs) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# --- end to end -----------------------------------------------------------------------------
def run_rounds(plan: Plan, phases: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Every phase once per round; the order rotates, so no phase always runs after the same one."""
    names = list(phases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(plan.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            samples[name].append(phases[name]())
    return samples


def throughput(stack, push: Callable[[str, list[int]], float], events, image_ids: list[int]) -> float:
    """``image_ids`` LPUSHed as backfill, until each one's event: img/s. Checks the rows."""
    events.forget(image_ids)
    t0 = push("backfill", image_ids)
    seen = events.wait(image_ids, EVENT_TIMEOUT_S)
    end = max(t for t, _ in seen.values())
    failed = [i for i, (_, state) in seen.items() if state != "tagged"]
    if failed:
        raise RuntimeError(f"{len(failed)} image(s) failed in the worker: {failed[:10]}")
    statuses = stack.statuses()
    committed = sum(statuses.get(i, ("",))[0] == "tagged" for i in image_ids)
    if committed != len(image_ids):
        raise RuntimeError(f"events for {len(seen)} images but {committed} tagged rows in the database")
    return len(seen) / (end - t0)


@dataclass
class Variant:
    """A variant's worker, on a Redis DB of its own, and what the benchmark sends and hears there."""

    name: str
    worker: Any
    client: Any  # redis.Redis on the variant's DB
    events: Any  # bench.traffic.Events

    def push(self, queue: str, image_ids: list[int]) -> float:
        from bench.stack import push

        return push(self.client, queue, image_ids)


def start_variants(plan: Plan, stack, claims: ExitStack, redis_url: str,
                   ids: dict[str, list[int]]) -> list[Variant]:
    """One worker per variant, each on a Redis DB of its own (same database, images and champion),
    warmed up."""
    import redis

    from bench.stack import claim_redis_db
    from bench.traffic import Events
    from shared.config import ENV_PREFIX
    from worker.process import WorkerProcess

    started = []
    for name, env in plan.variants:
        broker = claims.enter_context(claim_redis_db(redis_url))
        worker = WorkerProcess({**stack.env, ENV_PREFIX + "BROKER_URL": broker, **dict(env)}, stack.root / f"{name}.log")
        claims.callback(worker.stop)
        client = redis.Redis.from_url(broker)
        claims.callback(client.close)
        events = Events(broker)
        claims.callback(events.close)
        started.append(Variant(name, worker.start(), client, events))
    for variant in started:
        variant.worker.wait_ready()
        variant.push("tagging", ids["warmup"])
        variant.events.wait(ids["warmup"], EVENT_TIMEOUT_S)
    return started


def variant_phases(stack, variants: list[Variant], ids: dict[str, list[int]]) -> dict[str, Callable[[], float]]:
    """Each variant's end-to-end throughput, as phases of the rounds."""
    def phase(variant: Variant) -> Callable[[], float]:
        return lambda: throughput(stack, variant.push, variant.events, ids["throughput"])

    return {f"variant_{v.name}_img_s": phase(v) for v in variants}


def served_precision(worker) -> str:
    """The ``precision`` label of a worker's ``stilltag_model_info``."""
    info = worker.model_info()
    if info is None:
        raise RuntimeError("the worker's /metrics has no stilltag_model_info")
    return info["precision"]


def measure_end_to_end(plan: Plan, stack, worker, ids: dict[str, list[int]], phases: dict[str, Callable[[], float]],
                       variants: list[Variant], profile_dir: Path | None = None
                       ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The rounds (``phases`` and throughput through Redis → ``worker``, started, → database), then
    the two latency measures (uploads behind backfill also for each variant, right after). With
    ``profile_dir``, the worker is profiled over the end-to-end phases (bench/profile.py)."""
    from bench.profile import Profile
    from bench.traffic import Events

    worker.wait_ready()
    events = Events(stack.broker_url)
    try:
        stack.push("tagging", ids["warmup"])  # first batches pay for lazy initialisation
        events.wait(ids["warmup"], EVENT_TIMEOUT_S)
        if plan.compile_mode != "off":  # it compiles in the background: not during the rounds
            from bench.stack import poll_until

            poll_until(lambda: "model compiled" in worker.log() or "torch.compile (" in worker.log(),
                       EVENT_TIMEOUT_S, "the worker's model compiled")

        def end_to_end() -> float:
            return throughput(stack, stack.push, events, ids["throughput"])

        # The precision the worker resolved for itself (stilltag_model_info): the limit's must be the same.
        out: dict[str, Any] = {"worker_precision": served_precision(worker)}
        if out["worker_precision"] != plan.precision:
            raise RuntimeError(f"the worker serves {out['worker_precision']}, the limit was measured at {plan.precision}")
        if profile_dir is None:
            samples = run_rounds(plan, {**phases, "end_to_end_img_s": end_to_end})
        else:
            profile = Profile(worker.proc.pid, profile_dir).start()
            try:
                samples = run_rounds(plan, {**phases, "end_to_end_img_s": profile.timed(end_to_end)})
            finally:
                out["profile"] = profile.stop()

        sent: dict[int, float] = {}
        start = time.perf_counter()
        for k, image_id in enumerate(ids["trickle"]):
            time.sleep(max(0.0, start + k * TRICKLE_INTERVAL_MS / 1000 - time.perf_counter()))
            sent[image_id] = stack.push("tagging", [image_id])
        seen = events.wait(ids["trickle"], EVENT_TIMEOUT_S)
        latencies = [(seen[i][0] - sent[i]) * 1000 for i in ids["trickle"]]
        out["trickle_p50_ms"] = float(np.percentile(latencies, 50))
        out["trickle_p95_ms"] = float(np.percentile(latencies, 95))

        out.update(behind_backfill(plan, worker, stack.push, stack.redis, events, ids))
        for v in variants:
            out.update({f"variant_{v.name}_{key}": value for key, value in
                        behind_backfill(plan, v.worker, v.push, v.client, v.events, ids).items()})
        return samples, out
    finally:
        events.close()
        stack.stop_workers()


def behind_backfill(plan: Plan, worker, push: Callable[[str, list[int]], float], client, events,
                    ids: dict[str, list[int]]) -> dict[str, float]:
    """Uploads sent one by one while the worker chews through a backlog of ``plan.backfill``
    (more than it may hold): enqueue → commit of each. The backlog is dropped afterwards.
    ``push`` and ``client`` (redis.Redis): the worker's broker."""
    from bench.stack import poll_until

    events.forget(ids["upload"])  # the channel is the server's: another worker's events for them came too
    received = worker.metric("stilltag_messages_received_total")
    push("backfill", ids["backfill"])
    in_hand = 2 * plan.max_batch
    poll_until(lambda: worker.metric("stilltag_messages_received_total") >= received + in_hand, EVENT_TIMEOUT_S,
               f"the worker takes {in_hand} backfill messages", interval_s=0.01)
    waits = []
    for upload in ids["upload"]:
        t_upload = push("tagging", [upload])
        waits.append((events.wait([upload], EVENT_TIMEOUT_S)[upload][0] - t_upload) * 1000)
    left = client.llen("backfill")
    client.delete("backfill")
    poll_until(lambda: not client.hlen("unacked"), EVENT_TIMEOUT_S, "the held backfill committed")
    if not left:
        raise RuntimeError("the backlog ran out before the last upload: raise --backfill")
    return {"behind_backfill_ms": max(waits), "behind_backfill_p50_ms": float(np.median(waits))}


# --- report ---------------------------------------------------------------------------------
def report(plan: Plan, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base, limit = result["baseline_img_s"], result["limit_img_s"]
    table = Table(title=f"stilltag bench — {plan.arch} at {plan.size} px on {result['device_name']}, "
                        f"max_batch {plan.max_batch}, max_wait_ms {plan.max_wait_ms}, {plan.precision}, "
                        f"{plan.rounds} rounds")
    table.add_column("measure")
    table.add_column("images", justify="right")
    table.add_column("img/s (median)", justify="right")
    table.add_column("min–max", justify="right")
    table.add_column("× baseline", justify="right")
    table.add_column("of limit", justify="right")
    rows = [("baseline: learn.predict loop", plan.baseline_images, "baseline_img_s"),
            ("fastai batched: get_preds(test_dl)", plan.images, "fastai_batched_img_s"),
            ("limit: forward at max_batch", None, "limit_img_s")]
    if "limit_one_pass_img_s" in result:
        rows += [("one pass: the limit's batch whole (STILLTAG_CPU_STREAMS=1)", None, "limit_one_pass_img_s")]
    rows += [("decode + forward: in process, no broker, no DB", plan.images, "decode_and_forward_img_s"),
             ("end to end: Redis → worker → DB", plan.images, "end_to_end_img_s")]
    rows += [(f"variant {name}: {', '.join(f'{k}={v}' for k, v in env)}", plan.images, f"variant_{name}_img_s")
             for name, env in plan.variants]
    for name, n, key in rows:
        rate, (lo, hi) = result[key], result[f"{key}_spread"]
        table.add_row(name, str(n) if n else "-", f"{rate:.1f}", f"{lo:.1f}–{hi:.1f}", f"{rate / base:.2f}",
                      f"{rate / limit:.0%}")
    Console().print(table)
    load = (f"load average (1, 5, 15 min) {result['load_avg_start']} at the start, {result['load_avg_end']} "
            f"at the end, on {result['cores']} cores")
    Console().print(load)
    if result["busy_machine"]:
        Console().print(f"[bold yellow]warning:[/] the load was above half the cores ({result['cores'] / 2:g}): "
                        "other work shared the machine, the rates are low and noisy; the ratios hold better")

    decisions = [fig["decisions"] for fig in result["parity"].values()][:1] or [0]
    par = Table(title=f"parity against fp32 (worker path, {decisions[0]} decisions at {PARITY_THRESHOLD})")
    par.add_column("precision")
    par.add_column("max |Δp|", justify="right")
    par.add_column("p99 |Δp|", justify="right")
    par.add_column("flips", justify="right")
    par.add_column(f"within {PARITY_LIMITS['max_diff']} / {PARITY_LIMITS['p99_diff']} / "
                   f"{PARITY_LIMITS['flip_share']:.1%}")
    for precision, fig in result["parity"].items():
        par.add_row(precision, f"{fig['max_diff']:.4f}", f"{fig['p99_diff']:.4f}",
                    f"{fig['flips']} ({fig['flip_share']:.2%})", "yes" if fig["within_limits"] else "no")
    Console().print(par)

    lat = Table(title="latency, enqueue → commit")
    lat.add_column("measure")
    lat.add_column("ms", justify="right")
    lat.add_column("target ms", justify="right")
    lat.add_row(f"trickle p50 ({plan.trickle} uploads, one per {TRICKLE_INTERVAL_MS} ms)", f"{result['trickle_p50_ms']:.0f}", "")
    lat.add_row("trickle p95", f"{result['trickle_p95_ms']:.0f}", f"≤ {result['trickle_p95_target_ms']:.0f}")
    lat.add_row(f"uploads behind {plan.backfill} backfill, worst of {UPLOADS_BEHIND} (p50 "
                f"{result['behind_backfill_p50_ms']:.0f})", f"{result['behind_backfill_ms']:.0f}",
                f"≤ {result['behind_backfill_target_ms']:.0f}")
    for name, _env in plan.variants:
        lat.add_row(f"variant {name}: behind backfill, worst of {UPLOADS_BEHIND} (p50 "
                    f"{result[f'variant_{name}_behind_backfill_p50_ms']:.0f})",
                    f"{result[f'variant_{name}_behind_backfill_ms']:.0f}", f"≤ {result['behind_backfill_target_ms']:.0f}")
    lat.add_row("single-image forward pass", f"{result['single_forward_ms']:.0f}", "")
    Console().print(lat)

    checks = Table(title="targets")
    checks.add_column("ratio")
    checks.add_column("value", justify="right")
    checks.add_column("target", justify="right")
    checks.add_column("met")
    for name, value, target in result["targets"]:
        checks.add_row(name, f"{value:.2f}", f"≤ {target:.0f}" if name.endswith(" ms") else f"≥ {target:.2f}",
                       "yes" if _met(name, value, target) else "no")
    Console().print(checks)
    if "profile" in result:
        from bench.profile import render

        print(render(result["profile"]))


def _met(name: str, value: float, target: float) -> bool:
    return value <= target if name.endswith(" ms") else value >= target


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def load_figures() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def summarise(result: dict, samples: dict[str, list[float]]) -> None:
    """Median, min–max and the rounds of each rate."""
    for key, values in samples.items():
        result[key] = float(np.median(values))
        result[f"{key}_spread"] = [float(min(values)), float(max(values))]
        result[f"{key}_rounds"] = [float(v) for v in values]


def run_bench(plan: Plan, *, redis_url: str, pg_admin_url: str = "", profile_dir: Path | None = None) -> dict:
    from bench.stack import claimed_stack
    from bench.traffic import movie_jpegs

    cores = os.cpu_count() or 1
    result: dict = {"load_avg_start": load_figures(), "cores": cores}
    # A worker that makes no progress for stall_exit_s exits; loading several at once on a busy
    # machine can take longer than the default, and the benchmark would lose a variant for it.
    worker_settings = {"stall_exit_s": 900, "max_batch": plan.max_batch, "max_wait_ms": plan.max_wait_ms, "device": plan.device,
                       "inference_precision": plan.precision_setting, "inference_compile": plan.compile_mode}
    with tempfile.TemporaryDirectory(prefix="stilltag-bench-") as tmp, \
            claimed_stack(Path(tmp), redis_host_url=redis_url, pg_admin_url=pg_admin_url, **worker_settings) as stack, \
            ExitStack() as claims:
        counts = {"warmup": plan.max_batch, "throughput": plan.images, "trickle": plan.trickle,
                  "upload": UPLOADS_BEHIND}
        jpegs = movie_jpegs(sum(counts.values()), distinct_per_size=plan.distinct_per_size)
        # IDs of their own: the stilltag:tagged channel is shared by every DB of a Redis server, and
        # another run's events must not end this run's waits.
        first = base = random.SystemRandom().randrange(10**9, 10**12)
        paths = {i: stack.put_image(i, data) for i, data in enumerate(jpegs, start=base)}
        ids = {}
        for name, n in {**counts, "backfill": plan.backfill}.items():
            ids[name] = list(range(first, first + n))
            first += n
        for k, i in enumerate(ids["backfill"]):  # the backlog: links to the throughput images
            (stack.image_dir / f"{i}.jpg").symlink_to(paths[ids["throughput"][k % len(ids["throughput"])]])
        if plan.learner:
            learner = Path(plan.learner)
        else:
            learner = export_learner(Path(tmp) / "learner", arch=plan.arch, size=plan.size,
                                     train_images=0 if not plan.parity_images else
                                     16 if plan.parity_images < 64 else TRAIN_IMAGES)
        learn = load_fastai(learner, plan.device)
        if plan.learner:  # what is measured is the learner's own
            from worker.model import arch_name, preprocessing_of

            prep = preprocessing_of(learn)[0]
            plan = replace(plan, arch=arch_name(learn), size=max(prep.height, prep.width))
        if plan.parity_images:
            parity = measure_parity(plan, learn, movie_jpegs(plan.parity_images, seed=1,
                                                             distinct_per_size=-(-plan.parity_images // 4)))
            if plan.precision_setting == "auto":  # as a tagging worker resolves it for a model with this record
                from worker.model import resolve_precision

                plan = replace(plan, precision=resolve_precision("auto", plan.device, parity_records=parity)[0])
            own = compiled_key(plan) if plan.compile_mode != "off" else plan.precision
            chosen: dict[str, Any] = parity.get(own, {"max_diff": 0.0, "p99_diff": 0.0, "flip_share": 0.0})
        else:  # --no-parity: an untrained learner, no parity figures (profiling runs)
            parity, chosen = {}, dict.fromkeys(("max_diff", "p99_diff", "flip_share"))
        result["parity"] = parity
        result.update({"arch": plan.arch, "device": plan.device, "device_name": _device_name(plan.device),
                       "image_size": plan.size, "max_batch": plan.max_batch, "max_wait_ms": plan.max_wait_ms,
                       "images": plan.images, "baseline_images": plan.baseline_images, "rounds": plan.rounds,
                       "precision": plan.precision, "precision_setting": plan.precision_setting,
                       "compile": plan.compile_mode, "learner": plan.learner or "trained here",
                       "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024})
        for key in ("max_diff", "p99_diff", "flip_share"):
            result[f"parity_{key}"] = chosen[key]
        # With its parity records, as a retrain registers a model: the workers resolve "auto" from it themselves.
        stack.register_champion(learner, **({PARITY_KEY: {p: parity[p] for p in REDUCED}} if parity else {}))
        worker = stack.worker()  # it loads while this process and the variants' workers get ready
        phases = measure_fastai(plan, learn, [paths[i] for i in ids["throughput"]])
        limit = Limit(plan, learn)
        phases["limit_img_s"] = limit.img_s
        one_pass = None
        if limit.model.streams is not None:  # and the whole batch in one pass, as with STILLTAG_CPU_STREAMS=1
            one_pass = Limit(plan, learn, cpu_streams=1)
            phases["limit_one_pass_img_s"] = one_pass.img_s
        in_process = DecodeAndForward(plan, limit, [jpegs[i - base] for i in ids["throughput"]])
        phases["decode_and_forward_img_s"] = in_process.img_s
        variants = start_variants(plan, stack, claims, redis_url, ids)
        phases.update(variant_phases(stack, variants, ids))
        samples, latencies = measure_end_to_end(plan, stack, worker, ids, phases, variants, profile_dir)
        result["single_forward_ms"] = limit.single_ms()
        in_process.close()
        limit.release()
        if one_pass is not None:
            one_pass.release()
        del learn
        summarise(result, samples)
        result.update(latencies)
    result["load_avg_end"] = load_figures()
    result["load_avg_1m"] = [result["load_avg_start"][0], result["load_avg_end"][0]]
    result["busy_machine"] = max(result["load_avg_1m"]) > cores / 2
    target_ms = plan.max_wait_ms + 2 * result["single_forward_ms"] + 100
    result["trickle_p95_target_ms"] = target_ms
    # Behind any backlog: the batch in the forward pass, then the upload's own, at max_batch.
    result["behind_backfill_target_ms"] = plan.max_wait_ms + 2 * 1000 * plan.max_batch / result["limit_img_s"] + 100
    # Ratios of medians taken in the same rounds.
    result["end_to_end_vs_limit"] = result["end_to_end_img_s"] / result["limit_img_s"]
    result["end_to_end_vs_baseline"] = result["end_to_end_img_s"] / result["baseline_img_s"]
    # Where the gap to the limit goes: decoding on the same cores, then the worker's own costs.
    result["decode_and_forward_vs_limit"] = result["decode_and_forward_img_s"] / result["limit_img_s"]
    result["end_to_end_vs_decode_and_forward"] = result["end_to_end_img_s"] / result["decode_and_forward_img_s"]
    gpu = plan.device.startswith("cuda")
    result["targets"] = [("end_to_end / limit", result["end_to_end_vs_limit"], 0.80 if gpu else 0.85),
                         ("behind backfill ms", result["behind_backfill_ms"], result["behind_backfill_target_ms"])]
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
    rounds: Annotated[int, typer.Option(help=f"Rounds of every rate, phases interleaved (at least {MIN_ROUNDS}).")]
    = MIN_ROUNDS,
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto (as STILLTAG_INFERENCE_PRECISION); "
                                                "the limit and the worker both use it.")] = "auto",
    parity: Annotated[bool, typer.Option(help="Train the learner briefly and measure bf16/fp16 parity "
                                               "(--no-parity: an untrained learner, for quicker profiling runs).")]
    = True,
    compile_mode: Annotated[str, typer.Option("--compile", help="off, default or reduce-overhead "
                                                                 "(as STILLTAG_INFERENCE_COMPILE).")] = "off",
    variant: Annotated[list[str] | None, typer.Option(help="Another end-to-end worker in the same rounds, "
                                                           "NAME:STILLTAG_X=V[,...]; repeatable.")] = None,
    redis: Annotated[str, typer.Option(help="Redis server; an empty DB number 2-15 is claimed and flushed after.")]
    = "redis://127.0.0.1:6379",
    postgres: Annotated[str, typer.Option(help="PostgreSQL admin URL to create a throw-away database on; "
                                               "empty: SQLite in a temporary folder.")] = "",
    profile: Annotated[Path | None, typer.Option(help="Profile the worker over the end-to-end rounds (py-spy and "
                                                      "per-thread CPU) into this folder.")] = None,
    learner: Annotated[Path | None, typer.Option(help="Measure this exported learner (export.pkl) instead of one "
                                                      "trained here; its architecture and input size are its own.")]
    = None,
) -> None:
    """Measure the tagging worker: per-image predict, fastai batched, the model's limit, end to end, latency."""
    if rounds < MIN_ROUNDS:
        raise typer.BadParameter(f"at least {MIN_ROUNDS} rounds, so that a median and a spread mean something",
                                 param_hint="--rounds")
    variant = variant or []
    from shared.config import COMPILE_MODES, PRECISIONS

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"one of {', '.join(PRECISIONS)}", param_hint="--precision")
    if compile_mode not in COMPILE_MODES:
        raise typer.BadParameter(f"one of {', '.join(COMPILE_MODES)}", param_hint="--compile")
    if learner is not None and not learner.is_file():
        from shared.errors import UserError

        raise UserError(f"--learner {learner} is not a file; pass an export.pkl written by learn.export()")
    plan = make_plan(arch=arch, images=images, quick=quick, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     device=device, rounds=rounds, precision=precision, compile_mode=compile_mode,
                     variants=tuple(parse_variant(v) for v in variant), learner=str(learner or ""))
    if not parity:
        plan = replace(plan, parity_images=0)
    result = run_bench(plan, redis_url=redis.rstrip("/"), pg_admin_url=postgres, profile_dir=profile)
    # What was measured: the learner's own architecture and size, auto resolved with its parity.
    report(replace(plan, arch=result["arch"], size=result["image_size"], precision=result["precision"]), result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
