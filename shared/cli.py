"""The core commands of ``stilltag``: the schema, enqueueing and the model registry.

The command line itself is put together in ``stilltag/cli.py``, which adds these and the
commands of the training worker and the demo; this module imports nothing above ``shared``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.backfill_cli import backfill
from shared.config import get_settings
from shared.constants import BACKFILL_QUEUE, TAGGING_QUEUE
from shared.errors import UserError

db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
console = Console()


@contextmanager
def runtime():
    """The command's resources, closed when it ends (no connection left behind)."""
    from shared.runtime import Runtime

    rt = Runtime(get_settings())
    try:
        yield rt
    finally:
        rt.close()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the tables (PostgreSQL or SQLite)."""
    from sqlalchemy.engine import make_url

    from shared.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    console.print(f"schema up to date at {make_url(settings.database_url).render_as_string(hide_password=True)}")


def enqueue(
    image_ids: Annotated[list[int], typer.Argument(help="Image IDs to tag.")],
    queue: Annotated[str, typer.Option(help=f"{TAGGING_QUEUE} (uploads) or {BACKFILL_QUEUE} (bulk).")] = TAGGING_QUEUE,
) -> None:
    """Enqueue images for tagging, exactly as the website does."""
    if queue not in (TAGGING_QUEUE, BACKFILL_QUEUE):
        raise typer.BadParameter(f"queue must be {TAGGING_QUEUE} or {BACKFILL_QUEUE}", param_hint="--queue")
    from shared.celery_app import enqueue_tag_requests

    enqueue_tag_requests(get_settings(), image_ids, queue=queue)
    console.print(f"enqueued {len(image_ids)} image(s) on {queue!r}")


@models_app.command("register")
def models_register(
    path: Annotated[Path, typer.Argument(help="An export.pkl written by learn.export().")],
    promote: Annotated[bool, typer.Option("--promote", help="Make it the champion now.")] = False,
    arch: Annotated[str, typer.Option(help="Architecture name; read from the learner when omitted.")] = "",
) -> None:
    """Store an exported learner (e.g. trained in a notebook) as a new model version."""
    from shared import registry
    from shared.db import transaction
    from shared.learner_pickle import describe_learner

    if not path.is_file():  # checked here, not by click, so that it fails in one line like the rest
        raise UserError(f"{path} is not a file; pass the export.pkl written by learn.export()")
    info = describe_learner(path)  # the file is the admin's own: reading its vocabulary is safe here
    with runtime() as rt, transaction(rt.sessions) as session:
        record = registry.register(
            session=session, store=rt.model_store, artifact=path, arch=arch or info.arch, vocab=info.vocab
        )
        if promote:
            record = registry.promote(session=session, version=record.version, reason="promoted at registration")
    console.print(f"registered {record.version} ({record.arch}, {len(record.vocab)} tags, sha256 {record.sha256[:12]}…) "
                  f"as {record.status}")
    if promote:
        _retag(record.version, "promoted at registration")


@models_app.command("list")
def models_list() -> None:
    """Every model version, newest last."""
    from shared import registry

    with runtime() as rt, rt.sessions() as session:
        versions = registry.list_versions(session=session)
    table = Table("version", "status", "arch", "tags", "F2", "dataset", "created", "reason")
    for v in versions:
        f2 = v.metrics.get("f2")
        table.add_row(
            v.version, v.status, v.arch, str(len(v.vocab)), f"{f2:.4f}" if isinstance(f2, float) else "-",
            str(v.dataset_size or "-"), f"{v.created_at:%Y-%m-%d %H:%M}" if v.created_at else "-", v.reason or "",
        )
    console.print(table)


@models_app.command("promote")
def models_promote(version: str) -> None:
    """Make VERSION the champion; running tagging workers switch to it between batches."""
    from shared import registry
    from shared.db import transaction

    with runtime() as rt, transaction(rt.sessions) as session:
        record = registry.promote(session=session, version=version, reason="promoted by an admin")
    console.print(f"{record.version} is the champion")
    _retag(record.version, "promoted by an admin")


@models_app.command("rollback")
def models_rollback() -> None:
    """Go back to the previous champion."""
    from shared import registry
    from shared.db import transaction

    with runtime() as rt, transaction(rt.sessions) as session:
        record = registry.rollback(session=session)
    console.print(f"rolled back: {record.version} is the champion again")
    _retag(record.version, "rollback")


def _retag(version: str, reason: str) -> None:
    """With STILLTAG_RETAG_ON_PROMOTE, ask the training worker for a stale backfill (after the commit)."""
    from shared.backfill import request_retag
    from shared.constants import TRAINING_QUEUE

    task_id = request_retag(get_settings(), version=version, reason=reason)
    if task_id is not None:
        console.print(f"re-tag enqueued ({task_id}) on {TRAINING_QUEUE!r}: a training worker backfills what the "
                      "champion has not tagged")


def register(app: typer.Typer, models: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.add_typer(models, name="models")
    app.command()(enqueue)
    app.command()(backfill)
