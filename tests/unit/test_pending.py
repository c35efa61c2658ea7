"""How the tagging worker fills a batch from what it holds (worker/consumer.py ``Pending``)."""

import json
from concurrent.futures import Future

from worker.consumer import Held, Pending


def held(queue: str, n: int, at: float, *, decoded: bool = True) -> Held:
    future: Future = Future()
    if decoded:
        future.set_result(None)
    return Held(message=f"{queue}-{n}", queue=queue, future=future, arrived_at=at)


def fill(pending: Pending, queue: str, ns, at: float) -> None:
    for n in ns:
        pending.add(held(queue, n, at + n / 1000))


def test_uploads_go_first_then_backfill_oldest_first():
    p = Pending(("tagging", "backfill"), starve_s=60)
    fill(p, "backfill", range(10), at=0.0)
    fill(p, "tagging", range(3), at=1.0)  # arrived after the backfill
    batch = p.take(8, now=2.0)
    assert batch.messages == ["tagging-0", "tagging-1", "tagging-2", *(f"backfill-{n}" for n in range(5))]
    assert [h.message for h in p.drain()] == [f"backfill-{n}" for n in range(5, 10)]


def test_held_too_long_goes_first_whatever_its_queue():
    p = Pending(("tagging", "backfill"), starve_s=60)
    fill(p, "backfill", range(4), at=0.0)
    fill(p, "tagging", range(8), at=60.0)
    batch = p.take(8, now=60.0025)  # backfill-0..2 are held 60 s or more, backfill-3 is not
    assert batch.messages == ["backfill-0", "backfill-1", "backfill-2", *(f"tagging-{n}" for n in range(5))]


def test_a_batch_is_due_full_or_max_wait_after_its_oldest():
    p = Pending(("tagging", "backfill"), starve_s=60)
    assert p.due_at(max_batch=4, max_wait_s=0.05) is None
    fill(p, "backfill", range(2), at=10.0)
    fill(p, "tagging", range(1), at=10.5)
    assert p.due_at(max_batch=4, max_wait_s=0.05) == 10.05  # the oldest held message sets the clock
    fill(p, "tagging", range(1, 2), at=10.6)
    assert p.due_at(max_batch=4, max_wait_s=0.05) == 0.0  # full: now
    assert len(p) == 4


def test_a_batch_taken_ahead_goes_back_when_an_upload_outranks_it():
    p = Pending(("tagging", "backfill"), starve_s=60)
    fill(p, "backfill", range(6), at=0.0)
    ahead = p.take(4, now=1.0)  # staged during the previous forward pass
    assert not p.outranks(ahead)
    fill(p, "tagging", range(1), at=1.5)
    assert p.outranks(ahead)
    p.put_back(ahead)
    assert p.take(4, now=2.0).messages == ["tagging-0", "backfill-0", "backfill-1", "backfill-2"]
    assert [h.message for h in p.drain()] == ["backfill-3", "backfill-4", "backfill-5"]


def test_a_batch_carrying_uploads_is_topped_up_with_backfill_only_to_fill():
    p = Pending(("tagging", "backfill"), starve_s=60, fill=4)
    fill(p, "backfill", range(20), at=0.0)
    fill(p, "tagging", range(2), at=1.0)
    assert p.take(8, now=2.0).messages == ["tagging-0", "tagging-1", "backfill-0", "backfill-1"]
    # With no upload in hand, backfill fills the whole batch.
    assert p.take(8, now=2.0).messages == [f"backfill-{n}" for n in range(2, 10)]
    # More uploads than fill: all of them ride (up to max_batch), with no backfill.
    fill(p, "tagging", range(2, 8), at=3.0)
    assert p.take(8, now=4.0).messages == [f"tagging-{n}" for n in range(2, 8)]
    # Backfill held too long still goes first, and counts towards the fill.
    p = Pending(("tagging", "backfill"), starve_s=60, fill=4)
    fill(p, "backfill", range(3), at=0.0)
    fill(p, "backfill", range(3, 10), at=50.0)
    fill(p, "tagging", range(1), at=61.0)
    assert p.take(8, now=61.0).messages == ["backfill-0", "backfill-1", "backfill-2", "tagging-0"]

def test_an_uploads_batch_is_topped_up_only_with_backfill_already_decoded():
    p = Pending(("tagging", "backfill"), starve_s=60, fill=4)
    for n, decoded in enumerate([False, True, False, True, True, True]):
        p.add(held("backfill", n, 0.0 + n / 1000, decoded=decoded))
    fill(p, "tagging", range(1), at=1.0)
    assert p.take(8, now=2.0).messages == ["tagging-0", "backfill-1", "backfill-3", "backfill-4"]
    # What is still decoding keeps its place, oldest first.
    assert p.take(8, now=2.0).messages == ["backfill-0", "backfill-2", "backfill-5"]
    # Nothing decoded yet: the upload rides alone.
    p.add(held("backfill", 6, 3.0, decoded=False))
    fill(p, "tagging", range(1, 2), at=3.0)
    assert p.take(8, now=4.0).messages == ["tagging-1"]


def test_upload_fill_by_device():
    from shared.config import Settings
    from worker.service import upload_fill

    assert upload_fill(Settings(max_batch=64), gpu=False) == 16
    assert upload_fill(Settings(max_batch=64), gpu=True) == 64
    assert upload_fill(Settings(max_batch=2), gpu=False) == 1
    assert upload_fill(Settings(max_batch=64, upload_fill=32), gpu=False) == 32
    assert upload_fill(Settings(max_batch=64, upload_fill=500), gpu=True) == 64


def _message(queue: str, image_id: int):
    """What kombu hands ``BatchConsumer.on_message``: a ``stilltag.tag`` for ``image_id`` from ``queue``."""
    import json
    from types import SimpleNamespace

    from shared.constants import TAG_TASK

    return SimpleNamespace(content_type="application/json", body=json.dumps([[image_id], {}, {}]),
                           headers={"task": TAG_TASK}, delivery_info={"routing_key": queue})


def test_an_upload_goes_ahead_of_a_batch_still_decoding():
    """The inference thread takes a batch of backfill and waits for its decodes; an upload that
    arrives meanwhile (decoded in its own pool) runs first, and the backfill right after."""
    import threading
    from types import SimpleNamespace

    from bench.stack import poll_until
    from shared.config import Settings
    from worker.consumer import BatchConsumer

    futures: dict[int, Future] = {}

    def submit(image_id: int, *, upload: bool = False) -> Future:
        futures[image_id] = Future()
        return futures[image_id]

    tagger = SimpleNamespace(settings=Settings(broker_url="redis://127.0.0.1:6379/0", max_batch=4, max_wait_ms=10),
                             upload_fill=16, submit=submit)
    consumer = BatchConsumer(tagger, queues=("tagging", "backfill"))
    for image_id in range(1, 5):
        consumer.on_message(_message("backfill", image_id))
    taken: list = []
    inference = threading.Thread(target=lambda: taken.append(consumer._next_batch()))
    inference.start()
    poll_until(lambda: len(consumer.pending) == 0, 10, "the backfill batch taken")  # and waiting for decodes
    futures[2].set_result(None)
    consumer.on_message(_message("tagging", 100))
    futures[100].set_result(None)  # the upload decodes first
    inference.join(10)
    assert not inference.is_alive()
    assert [int(json.loads(h.message.body)[0][0]) for h in taken[0].items] == [100, 2]  # with what was decoded
    for f in futures.values():
        if not f.done():
            f.set_result(None)
    batch = consumer._next_batch()
    assert [int(json.loads(h.message.body)[0][0]) for h in batch.items] == [1, 3, 4]


def _consumer(max_batch: int = 4, **settings):
    """A BatchConsumer on a tagger whose decodes finish only when the test says (``futures``)."""
    from types import SimpleNamespace

    from shared.config import Settings
    from worker.consumer import BatchConsumer

    futures: dict[int, Future] = {}

    def submit(image_id: int, *, upload: bool = False) -> Future:
        futures[image_id] = Future()
        return futures[image_id]

    tagger = SimpleNamespace(settings=Settings(broker_url="redis://127.0.0.1:6379/0", max_batch=max_batch,
                                               max_wait_ms=10, **settings), upload_fill=None, submit=submit)
    return BatchConsumer(tagger, queues=("tagging", "backfill")), futures


def _ids(items) -> list[int]:
    return [int(json.loads(h.message.body)[0][0]) for h in items]


def test_a_batch_waiting_for_its_decodes_goes_back_to_the_queue_when_the_worker_stops():
    import threading

    from bench.stack import poll_until

    consumer, _futures = _consumer()
    for image_id in range(1, 5):
        consumer.on_message(_message("backfill", image_id))
    consumer._inference = threading.Thread(target=consumer._next_batch)
    consumer._inference.start()
    poll_until(lambda: len(consumer.pending) == 0, 10, "the batch taken, waiting for its decodes")
    left = consumer._close_inference()  # graceful stop: Celery's warm shutdown
    assert not consumer._inference.is_alive()
    assert sorted(_ids(left)) == [1, 2, 3, 4]  # returned to the queue now, not at the visibility timeout


def test_uploads_left_over_do_not_make_the_inference_thread_take_the_same_batch_again():
    """Backfill held too long rides first, with the oldest uploads; the uploads left over would
    outrank that batch at once. It waits for its decodes (releasing the lock) instead of putting
    the batch back and taking the very same one again, in a loop that holds the lock."""
    import threading

    from bench.stack import poll_until

    consumer, futures = _consumer()
    consumer.on_message(_message("backfill", 1))
    with consumer._cond:
        for lane in consumer.pending.lanes.values():
            for h in lane:
                h.arrived_at -= consumer.pending.starve_s  # held long enough to starve
    for image_id in range(100, 105):
        consumer.on_message(_message("tagging", image_id))
    takes = []
    take = consumer.pending.take
    consumer.pending.take = lambda *a: takes.append(1) or take(*a)
    taken: list = []
    inference = threading.Thread(target=lambda: taken.append(consumer._next_batch()))
    inference.start()
    poll_until(lambda: takes, 10, "the batch taken")
    assert consumer._cond.acquire(timeout=10), "the inference thread holds the lock: it spins"
    try:
        assert len(takes) == 1
    finally:
        consumer._cond.release()
    for f in futures.values():
        f.set_result(None)
    inference.join(10)
    assert _ids(taken[0].items) == [1, 100, 101, 102]


def test_the_first_queues_messages_decode_in_the_uploads_own_pool():
    """``BatchConsumer.on_message``: a message from the first of several queues (uploads) is fetched
    and decoded in the uploads' own pool, never behind the backfill the worker holds; the other
    queues', and those of a worker with one queue, in the shared one."""
    from types import SimpleNamespace

    from shared.config import Settings
    from worker.consumer import BatchConsumer

    for queues, upload in ((("tagging", "backfill"), {"tagging": True, "backfill": False}),
                           (("backfill",), {"backfill": False}), (("tagging",), {"tagging": False})):
        submitted: list[tuple[int, bool]] = []

        def submit(image_id: int, *, upload: bool = False, sent=submitted) -> Future:
            sent.append((image_id, upload))
            return Future()

        tagger = SimpleNamespace(settings=Settings(broker_url="redis://127.0.0.1:6379/0"), upload_fill=16,
                                 submit=submit)
        consumer = BatchConsumer(tagger, queues=queues)
        for image_id, queue in enumerate(queues):
            consumer.on_message(_message(queue, image_id))
        assert submitted == [(image_id, upload[queue]) for image_id, queue in enumerate(queues)]
        assert len(consumer.pending) == len(queues)
