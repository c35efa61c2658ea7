"""On a CPU the forward pass runs a batch as sub-batches side by side (STILLTAG_CPU_STREAMS), with
the whole batch's probabilities, on a real exported learner."""

import threading

import numpy as np
import pytest

from worker.model import TaggingModel

pytestmark = pytest.mark.integration


class Calls:
    """What ran the learner's model: each call's thread and batch size. The first ``meet`` calls
    wait for each other at a barrier, so they pass only if they run at the same time."""

    def __init__(self, module, *, meet: int = 0):
        self.seen: list[tuple[str, int]] = []
        self.barrier = threading.Barrier(meet, timeout=30) if meet else None
        self._lock = threading.Lock()
        self._handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, _module, args):
        with self._lock:
            self.seen.append((threading.current_thread().name, args[0].shape[0]))
            first = len(self.seen) <= (self.barrier.parties if self.barrier else 0)
        if first:
            self.barrier.wait()  # BrokenBarrierError after 30 s if the sub-batches run one after the other

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def pixels():
    return np.random.default_rng(5).integers(0, 256, (13, 64, 64, 3), dtype=np.uint8)


def test_sub_batches_run_side_by_side_and_give_the_whole_batchs_probabilities(tiny_learner, pixels):
    whole = TaggingModel.load(tiny_learner, version="v1", device="cpu", cpu_streams=1)
    split = TaggingModel.load(tiny_learner, version="v1", device="cpu", cpu_streams=2, cpu_sub_batch=4)
    calls = Calls(split.model, meet=2)
    try:
        ours = split.predict(pixels)
    finally:
        calls.remove()
    # 13 images, two streams, at most 4 each: four sub-batches as even as they can be, on the two
    # forward threads and not the caller's.
    assert sorted(size for _, size in calls.seen) == [3, 3, 3, 4]
    assert {name.rsplit("_", 1)[0] for name, _ in calls.seen} == {"forward"}
    assert len({name for name, _ in calls.seen}) == 2
    np.testing.assert_allclose(ours, whole.predict(pixels), atol=1e-5)
    assert (split.describe_forward(), whole.describe_forward()) == (
        "sub-batches of at most 4, 2 side by side", "whole batches")  # in the worker's log


def test_a_batch_too_small_to_split_runs_in_the_callers_thread(tiny_learner, pixels):
    model = TaggingModel.load(tiny_learner, version="v1", device="cpu", cpu_streams=2)
    calls = Calls(model.model)
    try:
        model.predict(pixels[:1])
    finally:
        calls.remove()
    assert calls.seen == [(threading.current_thread().name, 1)]


def test_releasing_the_model_stops_its_forward_threads(tiny_learner, pixels):
    before = set(threading.enumerate())
    model = TaggingModel.load(tiny_learner, version="v1", device="cpu", cpu_streams=2)
    calls = Calls(model.model, meet=2)  # both forward threads exist: they met
    try:
        model.predict(pixels)
    finally:
        calls.remove()
    threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("forward")]
    assert len(threads) == 2
    model.release()
    assert not [t for t in threads if t.is_alive()]
