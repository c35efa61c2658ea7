"""The one settings object: every ``STILLTAG_*`` environment variable, validated at start-up.

With nothing set, everything runs on one machine with no server (SQLite, local folders, a
file-system broker). Production sets the URLs; the code path is the same.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.constants import REDIS_SCHEMES
from shared.errors import ENV_PREFIX, SettingsError

STORE_SCHEMES = ("file://", "s3://")  # what shared.stores.open_store reads
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # STILLTAG_INFERENCE_PRECISION
COMPILE_MODES = ("off", "default", "reduce-overhead")  # STILLTAG_INFERENCE_COMPILE
# Ten batches: a worker holds up to three, so the queue still feeds it while a backfill polls
# (every 0.1 s), and Redis holds a few hundred kB at most (a message is ~0.7 kB).
BACKFILL_PENDING_BATCHES = 10


class Settings(BaseSettings):
    """All of stilltag's configuration. Field ``x`` is read from ``STILLTAG_X``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(
        default=Path(".stilltag"),
        description="Folder for the embedded defaults (SQLite file, images, models, broker).",
    )
    broker_url: str = Field(
        default="filesystem://",
        description="Celery broker. redis://host:6379/0 in production; filesystem:// needs no server.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means SQLite in the data folder.",
    )
    image_url: str = Field(
        default="",
        description="Where image bytes live: file:///data/stills/{image_id}.jpg or s3://bucket/{image_id}.jpg.",
    )
    model_store: str = Field(
        default="",
        description="Where model versions are stored: file:///models or s3://bucket/models.",
    )
    s3_endpoint_url: str = Field(
        default="",
        description="S3-compatible endpoint (MinIO: http://minio:9000); empty means AWS.",
    )
    events_url: str = Field(
        default="",
        description="Redis for the stilltag:tagged events; empty means the broker when it is Redis.",
    )

    # --- tagging ----------------------------------------------------------------------
    max_batch: int = Field(default=64, ge=1, le=4096, description="Images per forward pass, at most.")
    max_wait_ms: int = Field(
        default=50, ge=0, le=60_000, description="Longest wait for more images after the first."
    )
    upload_fill: int = Field(
        default=0, ge=0, le=4096,
        description="A batch carrying uploads is topped up with backfill to this many images; "
                    "0 = max_batch on a GPU, max_batch/4 on a CPU.",
    )
    threshold: float = Field(default=0.2, gt=0.0, lt=1.0, description="Keep tags at or above this probability.")
    thresholds: Literal["global", "per_tag"] = Field(
        default="global",
        description="global: every tag at STILLTAG_THRESHOLD; per_tag: each tag at the threshold stored with the model.",
    )
    top_k: int = Field(default=10, ge=1, description="Keep at most this many tags per image.")
    device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    inference_precision: str = Field(
        default="auto",
        description="fp32, bf16, fp16 or auto (a reduced precision only where the model's own parity record "
                    "for it holds: on a GPU fp16, else bf16; on a CPU bf16 where it is native; else fp32).",
    )
    inference_compile: str = Field(
        default="off",
        description="torch.compile the model: off, default or reduce-overhead (CUDA graphs); compiled in the background.",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=256,
        description="torch intra-op threads (on a CPU, of each stream: STILLTAG_CPU_STREAMS); 0 = one per CPU core."
    )
    cpu_streams: int = Field(
        default=2, ge=1, le=64,
        description="On a CPU, a batch's forward pass runs as sub-batches, this many side by side, each with "
                    "STILLTAG_TORCH_THREADS threads of its own; 1 = the whole batch in one pass. Not with "
                    "torch.compile or on a GPU.",
    )
    cpu_sub_batch: int = Field(
        default=16, ge=1, le=4096, description="The largest of those sub-batches (STILLTAG_CPU_STREAMS)."
    )
    gpu_decode: bool = Field(
        default=False,
        description="Decode JPEGs on the GPU in batches (torchvision.io.decode_jpeg); CUDA only.",
    )
    jpeg_decoder: Literal["torchvision", "pil"] = Field(
        default="torchvision",
        description="torchvision: libjpeg-turbo and torchvision's resize, half the CPU per JPEG, within one "
                    "grey level of pil; pil: exactly learn.predict's decode and resize.",
    )
    fetch_concurrency: int = Field(
        default=16, ge=1, le=512,
        description="Concurrent image fetches from S3 per batch (a file:// image is read by the thread that decodes it).",
    )
    decode_workers: int = Field(
        default=0, ge=0, le=256,
        description="Images decoded at once (S3 fetches run apart), and as many again for uploads, which have "
                    "threads of their own; 0 = one per CPU core.",
    )
    decode_nice: int | Literal["idle"] = Field(
        default=10,
        description="Priority of the fetch/decode threads (Linux): a niceness 0-19 (above 0 the forward pass gets "
                    "the cores first), or idle: only on a core nothing else wants (SCHED_IDLE; a dedicated host only).",
    )
    max_image_pixels: int = Field(
        default=80_000_000, ge=1, description="Larger images are refused (decompression bombs)."
    )
    max_image_bytes: int = Field(default=64_000_000, ge=1, description="Larger files are refused.")
    model_poll_s: float = Field(
        default=5.0, gt=0, description="How often a tagging worker checks for a new champion."
    )

    # --- delivery ---------------------------------------------------------------------
    visibility_timeout_s: int = Field(
        default=120,
        ge=1,
        description="An unacknowledged message is handed out again after this long (Redis broker).",
    )
    restore_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often each tagging worker returns expired unacknowledged messages to their queue.",
    )

    # --- operations -------------------------------------------------------------------
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="HTTP port for /livez, /readyz and /metrics; 0 turns it off (one port per process).",
    )
    stall_exit_s: float = Field(
        default=120.0,
        ge=10,
        description="A tagging worker that makes no progress this long while messages wait exits non-zero.",
    )

    # --- backfill ---------------------------------------------------------------------
    backfill_query: str = Field(
        default="",
        description="SQL on the website's database returning one column image_id: the archive that "
        "`stilltag backfill --stale` and re-tag on promotion go through.",
    )
    backfill_max_pending: int = Field(
        default=0,
        ge=0,
        description="A backfill waits while the backfill queue holds more messages than this; "
        "0 means 10 x STILLTAG_MAX_BATCH.",
    )
    retag_on_promote: bool = Field(
        default=False,
        description="After every promotion or rollback, the training worker re-tags what the new champion "
        "has not tagged (a stale backfill over STILLTAG_BACKFILL_QUERY).",
    )

    # --- training ---------------------------------------------------------------------
    train_arch: str = Field(default="resnet152", description="torchvision/fastai architecture name.")
    train_pretrained: bool = Field(default=True, description="Start from ImageNet weights (needs a download).")
    train_weights: str = Field(
        default="", description="A torchvision state dict (.pth) to start from instead of downloading ImageNet weights."
    )
    train_image_size: int = Field(default=224, ge=16, description="Square input size of the model.")
    train_batch_size: int = Field(default=64, ge=1)
    train_lr: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Learning rate; 0 lets lr_find pick it (its curve is in the report either way)."
    )
    train_epochs_frozen: int = Field(default=3, ge=0)
    train_epochs_unfrozen: int = Field(default=5, ge=0)
    train_patience: int = Field(default=2, ge=1, description="Epochs without a better valid loss before stopping.")
    train_min_tag_images: int = Field(default=10, ge=1, description="Tags on fewer images are left out.")
    train_parity_images: int = Field(
        default=256, ge=0, le=100_000,
        description="Validation and holdout pictures run again under bf16 to decide whether tagging workers may serve "
                    "the model in bf16 (auto); 0: not measured, served in fp32. Slow on a CPU without native bf16.",
    )
    threshold_floor: float = Field(default=0.05, gt=0.0, lt=1.0, description="Per-tag thresholds are at least this.")
    threshold_ceiling: float = Field(default=0.8, gt=0.0, lt=1.0, description="Per-tag thresholds are at most this.")
    threshold_min_positives: int = Field(
        default=10, ge=1, description="A tag on fewer validation images keeps STILLTAG_THRESHOLD as its threshold."
    )
    holdout_pct: int = Field(default=10, ge=1, le=50, description="Share of images in the fixed holdout.")
    holdout_seed: str = Field(default="stilltag", description="Seed of the holdout's hash rule.")
    dataset_query: str = Field(
        default="SELECT image_id, tag FROM image_tags ORDER BY image_id",
        description="SQL returning (image_id, tag) rows, one per tag, or (image_id, tags) with tags space-separated.",
    )
    gate_tolerance: float = Field(
        default=0.0, ge=0.0, le=1.0, description="A new model may be this much worse in F2 and still win."
    )
    retrain_schedule: str = Field(
        default="0 3 1 * *", description="Cron schedule of the beat-driven retrain (monthly by default)."
    )
    orphan_check_s: float = Field(
        default=60.0, gt=0,
        description="How often a training worker looks for retrain runs left running by a worker that died "
                    "on another host (failed once its lock has expired and two checks agree).",
    )

    @field_validator("decode_nice", mode="before")
    @classmethod
    def _niceness_or_idle(cls, v):
        if isinstance(v, str) and v.strip().lower() == "idle":
            return "idle"
        try:
            nice = int(v)
        except (TypeError, ValueError):
            nice = -1
        if not 0 <= nice <= 19:
            raise ValueError("STILLTAG_DECODE_NICE must be a niceness from 0 to 19, or idle")
        return nice

    @field_validator("image_url")
    @classmethod
    def _image_url_has_placeholder(cls, value: str) -> str:
        if value and "{image_id}" not in value:
            raise ValueError("STILLTAG_IMAGE_URL must contain {image_id}, e.g. s3://stills/{image_id}.jpg")
        if value and not value.startswith(STORE_SCHEMES):
            raise ValueError("STILLTAG_IMAGE_URL must start with file:// or s3://, e.g. s3://stills/{image_id}.jpg")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_supported(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme.startswith("sentinel"):
            raise ValueError(
                "Redis Sentinel URLs are not supported: the tagging worker's atomic pop and the events "
                "client talk to one Redis; point STILLTAG_BROKER_URL at the master through a proxy that "
                "follows failover (README, \"Broker faults\")"
            )
        if scheme not in (*REDIS_SCHEMES, "filesystem", "memory"):
            raise ValueError("STILLTAG_BROKER_URL must be redis://, rediss:// or filesystem://")
        return value

    @field_validator("model_store")
    @classmethod
    def _model_store_scheme(cls, value: str) -> str:
        if value and not value.startswith(STORE_SCHEMES):
            raise ValueError("STILLTAG_MODEL_STORE must be file:///path or s3://bucket/prefix")
        return value

    @field_validator("retrain_schedule")
    @classmethod
    def _schedule_is_cron(cls, value: str) -> str:
        # Every process builds the beat schedule from this (shared/celery_app.py): refuse a bad one here.
        from shared.schedule import retrain_crontab

        retrain_crontab(value)
        return value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("STILLTAG_DEVICE must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("inference_precision")
    @classmethod
    def _precision_known(cls, value: str) -> str:
        if value not in PRECISIONS:
            raise ValueError(f"STILLTAG_INFERENCE_PRECISION must be one of {', '.join(PRECISIONS)}")
        return value

    @field_validator("inference_compile")
    @classmethod
    def _compile_known(cls, value: str) -> str:
        if value not in COMPILE_MODES:
            raise ValueError(f"STILLTAG_INFERENCE_COMPILE must be one of {', '.join(COMPILE_MODES)}")
        return value

    @model_validator(mode="after")
    def _threshold_bounds_ordered(self) -> Settings:
        if self.threshold_floor > self.threshold_ceiling:
            raise ValueError(f"STILLTAG_THRESHOLD_FLOOR ({self.threshold_floor:g}) must not exceed "
                             f"STILLTAG_THRESHOLD_CEILING ({self.threshold_ceiling:g})")
        return self

    @model_validator(mode="after")
    def _retag_needs_query(self) -> Settings:
        if self.retag_on_promote and not self.backfill_query.strip():
            raise ValueError("STILLTAG_RETAG_ON_PROMOTE=true needs STILLTAG_BACKFILL_QUERY, the SQL that lists "
                             "the archive's image IDs (e.g. SELECT id AS image_id FROM stills)")
        return self

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'stilltag.db'}")
        if not self.image_url:
            object.__setattr__(self, "image_url", f"file://{data_dir / 'images'}/{{image_id}}.jpg")
        if not self.model_store:
            object.__setattr__(self, "model_store", f"file://{data_dir / 'models'}")
        if not self.events_url and self.broker_is_redis:
            object.__setattr__(self, "events_url", self.broker_url)
        return self

    @property
    def max_pending(self) -> int:
        """The backfill bound: ``backfill_max_pending``, or ten batches when it is 0."""
        return self.backfill_max_pending or BACKFILL_PENDING_BATCHES * self.max_batch

    @property
    def broker_scheme(self) -> str:
        return self.broker_url.split("://", 1)[0]

    @property
    def broker_is_redis(self) -> bool:
        """Redis, plain or over TLS: the one check every Redis-only feature uses."""
        return self.broker_scheme in REDIS_SCHEMES


def unknown_env_names(environ: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    """``STILLTAG_*`` variables that name no setting (usually a typo)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, refusing unknown ``STILLTAG_*`` names."""
    unknown = unknown_env_names()
    if unknown:
        known = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
        names = []
        for name in unknown:
            close = difflib.get_close_matches(name.upper(), known, n=1)
            names.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise SettingsError(
            f"unknown setting(s) {', '.join(names)}; known STILLTAG_* names are listed in README.md"
        )
    return Settings(**overrides)  # type: ignore[arg-type]  # pydantic validates each value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests build their own with ``Settings(...)``."""
    return load_settings()


