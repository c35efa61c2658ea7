"""``stilltag demo``, added to the command line by ``stilltag/cli.py``."""

from __future__ import annotations

import typer


def demo() -> None:
    """Train a small model on generated pictures, run a real worker, and show its tags and F2."""
    from demo.run import run_demo
    from shared.config import get_settings

    run_demo(get_settings())


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    app.command()(demo)
