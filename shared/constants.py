"""Names that the website, the workers and the operators share.

Changing any of these is a breaking change of the contract in README.md.
"""

TAG_TASK = "stilltag.tag"
RETRAIN_TASK = "stilltag.retrain"

TAGGING_QUEUE = "tagging"  # uploads: always served first
BACKFILL_QUEUE = "backfill"  # bulk work: served when no upload waits
TRAINING_QUEUE = "training"  # retraining, consumed only by training workers
TAGGING_QUEUES = (TAGGING_QUEUE, BACKFILL_QUEUE)
TASK_QUEUES = (*TAGGING_QUEUES, TRAINING_QUEUE)  # where task messages are checked before use

ENQUEUED_AT_HEADER = "stilltag_enqueued_at"  # optional message header: Unix time of the enqueue, seconds
TAGGED_CHANNEL = "stilltag:tagged"  # Redis pub/sub, one JSON event per image after commit
RETRAIN_CHANNEL = "stilltag:retrain"  # Redis pub/sub, one JSON event per retrain state or stage change
PARKED_KEY = "stilltag:parked"  # Redis list of malformed messages, newest first
PARKED_MAX_LEN = 10_000  # parked messages kept before the oldest are trimmed

STATE_TAGGED = "tagged"
STATE_FAILED = "failed"

RUN_QUEUED = "queued"  # retrain_runs.state
RUN_RUNNING = "running"
RUN_SUCCEEDED = "succeeded"
RUN_FAILED = "failed"
RUN_SKIPPED = "skipped"
RUN_STATES = (RUN_QUEUED, RUN_RUNNING, RUN_SUCCEEDED, RUN_FAILED, RUN_SKIPPED)

MODEL_CANDIDATE = "candidate"
MODEL_CHAMPION = "champion"
MODEL_RETIRED = "retired"

ARTIFACT_NAME = "export.pkl"

RETRAIN_LOCK_KEY = "stilltag:retrain-lock"  # Redis lock held while a retrain runs (Redis broker)
RETRAIN_LOCK_FILE = "retrain.lock"  # fcntl lock in the data folder (any other broker)

REDIS_SCHEMES = ("redis", "rediss")  # broker URL schemes of the Redis transport (rediss: TLS)

RETAG_TASK = "stilltag.retag"  # a stale backfill after a promotion, run by the training worker
BACKFILL_ENQUEUED_KEY = "stilltag:backfill:enqueued"  # Redis counter: messages every backfill has sent
BACKFILL_CURSOR_KEY = "stilltag:backfill:cursor:{selection}"  # highest image ID an interrupted run sent
