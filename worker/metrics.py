"""The tagging worker's Prometheus metrics (README, "Metrics"), one set per process.

Queue wait, decode, inference and persist are separate histograms, as Triton and Ray Serve
report them, so an operator sees where the time of an image goes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds, from a few milliseconds (a small batch on a GPU) to minutes (a backlog on a CPU).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

IMAGES = Counter("stilltag_images", "Images written, by outcome (tagged or failed).", ["state"])
RECEIVED = Counter("stilltag_messages_received", "Messages taken from the broker (parked ones included).")
BATCHES = Counter("stilltag_batches", "Batches committed.")
BATCH_SIZE = Histogram("stilltag_batch_size", "Images per committed batch.", buckets=BATCH_SIZE_BUCKETS)
QUEUE_WAIT = Histogram("stilltag_queue_wait_seconds", "From a message reaching the worker to its batch starting.",
                       buckets=LATENCY_BUCKETS_S)
DECODE = Histogram("stilltag_decode_seconds", "Fetch and decode of one image.", buckets=LATENCY_BUCKETS_S)
INFERENCE = Histogram("stilltag_inference_seconds", "One batched forward pass.", buckets=LATENCY_BUCKETS_S)
PERSIST = Histogram("stilltag_persist_seconds", "One batch's transaction and its events.", buckets=LATENCY_BUCKETS_S)
ENQUEUE_TO_COMMIT = Histogram(
    "stilltag_enqueue_to_commit_seconds",
    "From the website's enqueue (the optional stilltag_enqueued_at header) to the commit of its rows.",
    buckets=LATENCY_BUCKETS_S,
)
MODEL_INFO = Gauge("stilltag_model_info", "The model this worker tags with (value 1).",
                   ["version", "arch", "device", "precision"])
MODEL_SWITCHES = Counter("stilltag_model_switches", "Switches to a new champion without a restart.")
RECONNECTS = Counter("stilltag_broker_reconnects", "Broker connections lost and made again.")
BATCH_FAILURES = Counter("stilltag_batch_failures", "Batches that did not commit (their messages went back).")
LIVE = Gauge("stilltag_consumer_live", "1 while /livez passes, 0 while it fails (set by the watchdog every 5 s).")
LAST_PROGRESS = Gauge("stilltag_consumer_last_progress_timestamp_seconds",
                      "When the consumer last took a message or committed a batch (Unix time).")

for state in ("tagged", "failed"):  # present from the start, so rate() works from the first failure
    IMAGES.labels(state)


def set_model(version: str, arch: str, device: str, precision: str) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(version=version, arch=arch, device=device, precision=precision).set(1)
