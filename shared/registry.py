"""The model registry: versions in the model store, their records in ``model_versions``.

A version is an exported fastai learner (``export.pkl``) with its sha256, architecture, tag
vocabulary and metrics. Exactly one version is the champion; tagging workers tag with it.
Because the learner is a pickle, nothing is unpickled unless its sha256 matches the record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.constants import ARTIFACT_NAME, MODEL_CANDIDATE, MODEL_CHAMPION, MODEL_RETIRED
from shared.db import model_versions
from shared.errors import UserError
from shared.parity import METRICS_KEY as PARITY_KEY
from shared.parity import records
from shared.stores import Store

MODEL_ROLLED_BACK = "rolled_back"
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB


class RegistryError(UserError):
    """A registry operation cannot be done; the message says why and what to do."""


class ArtifactMismatch(RegistryError):
    """The stored learner's sha256 is not the one recorded: it is not loaded."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    sha256: str
    arch: str
    vocab: list[str]
    metrics: dict = field(default_factory=dict)
    dataset_size: int | None = None
    snapshot_at: dt.datetime | None = None
    status: str = MODEL_CANDIDATE
    reason: str | None = None
    created_at: dt.datetime | None = None
    promoted_at: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: sa.Row) -> ModelVersion:
        return cls(**row._asdict())


def tag_thresholds(record: ModelVersion) -> dict[str, float] | None:
    """The per-tag thresholds stored with a version (``metrics["thresholds"]``, chosen on the
    validation split by the retrain), or None for a version without them (registered by hand)."""
    value = (record.metrics or {}).get("thresholds")
    if not isinstance(value, dict) or not value:
        return None
    return {str(tag): float(t) for tag, t in value.items() if isinstance(t, (int, float))}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def next_version(*, session: Session) -> str:
    numbers = [
        int(m.group(1))
        for (v,) in session.execute(sa.select(model_versions.c.version))
        if (m := re.fullmatch(r"v(\d+)", v))
    ]
    return f"v{max(numbers, default=0) + 1}"


def get_version(*, session: Session, version: str) -> ModelVersion:
    row = session.execute(sa.select(model_versions).where(model_versions.c.version == version)).first()
    if row is None:
        raise RegistryError(f"no model version {version!r}; `stilltag models list` shows the versions")
    return ModelVersion.from_row(row)


def list_versions(*, session: Session) -> list[ModelVersion]:
    rows = session.execute(sa.select(model_versions).order_by(model_versions.c.created_at, model_versions.c.version))
    return [ModelVersion.from_row(r) for r in rows]


def champion(*, session: Session) -> ModelVersion | None:
    row = session.execute(sa.select(model_versions).where(model_versions.c.status == MODEL_CHAMPION)).first()
    return ModelVersion.from_row(row) if row else None


def champion_version(*, session: Session) -> str | None:
    """Just the champion's version string."""
    return session.execute(
        sa.select(model_versions.c.version).where(model_versions.c.status == MODEL_CHAMPION)
    ).scalar_one_or_none()


def champion_parity(*, session: Session) -> tuple[str, dict[str, dict]] | None:
    """The champion's version and its parity records by precision (what ``parity.recorded`` reads
    from the whole metrics): the cheap query tagging workers poll (two values of one row)."""
    row = session.execute(
        sa.select(model_versions.c.version, model_versions.c.metrics[PARITY_KEY])
        .where(model_versions.c.status == MODEL_CHAMPION)
    ).first()
    if row is None:
        return None
    version, stored = row
    return version, records(stored)


def register(
    *,
    session: Session,
    store: Store,
    artifact: Path,
    arch: str,
    vocab: list[str],
    metrics: dict | None = None,
    dataset_size: int | None = None,
    snapshot_at: dt.datetime | None = None,
    extra_files: dict[str, Path] | None = None,
    version: str | None = None,
) -> ModelVersion:
    """Copy ``artifact`` (and report files) into the store and record it as a candidate."""
    if not artifact.is_file():
        raise RegistryError(f"{artifact} is not a file; pass the export.pkl written by learn.export()")
    version = version or next_version(session=session)
    digest = sha256_file(artifact)
    store.put_file(f"{version}/{ARTIFACT_NAME}", artifact)
    for name, path in (extra_files or {}).items():
        store.put_file(f"{version}/{name}", path)
    record = ModelVersion(
        version=version,
        sha256=digest,
        arch=arch,
        vocab=list(vocab),
        metrics=dict(metrics or {}),
        dataset_size=dataset_size,
        snapshot_at=snapshot_at,
        status=MODEL_CANDIDATE,
        created_at=_now(),
    )
    meta = {k: v for k, v in record.__dict__.items() if k not in ("status", "reason", "promoted_at")}
    store.put(f"{version}/meta.json", json.dumps(meta, default=str, indent=2).encode())
    session.execute(sa.insert(model_versions).values(**record.__dict__))
    return record


def promote(*, session: Session, version: str, reason: str | None = None) -> ModelVersion:
    """Make ``version`` the champion; the previous champion is retired (and can be rolled back to)."""
    target = get_version(session=session, version=version)
    if target.status == MODEL_CHAMPION:
        return target
    now = _now()
    session.execute(
        sa.update(model_versions)
        .where(model_versions.c.status == MODEL_CHAMPION)
        .values(status=MODEL_RETIRED)
    )
    session.execute(
        sa.update(model_versions)
        .where(model_versions.c.version == version)
        .values(status=MODEL_CHAMPION, promoted_at=now, reason=reason or target.reason)
    )
    return get_version(session=session, version=version)


def add_metrics(*, session: Session, version: str, **items) -> ModelVersion:
    """Store ``items`` in a version's ``metrics`` (e.g. parity records measured after it was
    registered), keeping the rest."""
    target = get_version(session=session, version=version)
    session.execute(sa.update(model_versions).where(model_versions.c.version == version)
                    .values(metrics={**(target.metrics or {}), **items}))
    return get_version(session=session, version=version)


def set_candidate_reason(*, session: Session, version: str, reason: str) -> None:
    session.execute(sa.update(model_versions).where(model_versions.c.version == version).values(reason=reason))


def rollback(*, session: Session) -> ModelVersion:
    """Return to the champion before the current one; the current one is marked rolled back."""
    current = champion(session=session)
    if current is None:
        raise RegistryError("there is no champion to roll back from")
    previous = session.execute(
        sa.select(model_versions.c.version)
        .where(model_versions.c.status == MODEL_RETIRED, model_versions.c.promoted_at.is_not(None))
        .order_by(model_versions.c.promoted_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    if previous is None:
        raise RegistryError(f"{current.version} is the only model that was ever champion; nothing to roll back to")
    session.execute(
        sa.update(model_versions)
        .where(model_versions.c.version == current.version)
        .values(status=MODEL_ROLLED_BACK, reason=f"rolled back at {_now().isoformat(timespec='seconds')}")
    )
    session.execute(
        sa.update(model_versions)
        .where(model_versions.c.version == previous)
        .values(status=MODEL_CHAMPION, promoted_at=_now())
    )
    return get_version(session=session, version=previous)


def fetch_artifact(*, store: Store, record: ModelVersion, cache_dir: Path) -> Path:
    """A local copy of the version's learner whose sha256 matches the registry.

    Raises:
        ArtifactMismatch: the stored file is not the one that was registered.
    """
    local = cache_dir / record.version / ARTIFACT_NAME
    if not (local.is_file() and sha256_file(local) == record.sha256):
        local.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local.parent, suffix=".part", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            store.get_file(f"{record.version}/{ARTIFACT_NAME}", tmp_path)
            tmp_path.replace(local)
        finally:
            tmp_path.unlink(missing_ok=True)
    actual = sha256_file(local)
    if actual != record.sha256:
        raise ArtifactMismatch(
            f"model {record.version}: {store.location(f'{record.version}/{ARTIFACT_NAME}')} has sha256 "
            f"{actual[:12]}…, the registry says {record.sha256[:12]}…; refusing to unpickle it. "
            "Register the file again with `stilltag models register PATH`."
        )
    return local
