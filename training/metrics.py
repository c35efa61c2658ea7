"""The training worker's Prometheus metrics (README, "Metrics")."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = ("champion", "candidate", "failed", "skipped")

RETRAIN_RUNS = Counter("stilltag_retrain_runs", "Retrains run by this worker, by outcome.", ["outcome"])
RETRAIN_DURATION = Histogram("stilltag_retrain_duration_seconds", "Wall time of one retrain, failed ones included.",
                             buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400))
RETRAIN_LAST_SUCCESS = Gauge("stilltag_retrain_last_success_timestamp_seconds",
                             "When the last retrain that registered a model finished (Unix time); 0 before any.")

for outcome in OUTCOMES:  # present from the start, so increase() and alerts work from the first run
    RETRAIN_RUNS.labels(outcome)
