"""Print the README's configuration table from ``shared.config.Settings``.

    uv run python scripts/settings_table.py            # print it
    uv run python scripts/settings_table.py --write    # replace it in README.md

tests/unit/test_readme.py fails when README.md's table differs from this output, so a new
setting needs an example here and a regenerated README.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from shared.config import ENV_PREFIX, Settings

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- settings-table:start (scripts/settings_table.py --write) -->"
END = "<!-- settings-table:end -->"

# One realistic production value per setting.
EXAMPLES: dict[str, str] = {
    "data_dir": "/var/lib/stilltag",
    "broker_url": "redis://:secret@redis:6379/0",
    "database_url": "postgresql+psycopg://stilltag:secret@postgres:5432/stilltag",
    "image_url": "s3://stills/{image_id}.jpg",
    "model_store": "s3://models",
    "s3_endpoint_url": "http://minio:9000",
    "events_url": "redis://:secret@redis:6379/1",
    "max_batch": "128",
    "max_wait_ms": "20",
    "upload_fill": "16",
    "threshold": "0.3",
    "thresholds": "per_tag",
    "top_k": "5",
    "device": "cuda:0",
    "inference_precision": "bf16",
    "inference_compile": "reduce-overhead",
    "torch_threads": "2",
    "cpu_streams": "1",
    "cpu_sub_batch": "32",
    "gpu_decode": "true",
    "jpeg_decoder": "pil",
    "fetch_concurrency": "32",
    "decode_workers": "8",
    "decode_nice": "idle",
    "max_image_pixels": "50000000",
    "max_image_bytes": "32000000",
    "model_poll_s": "10",
    "visibility_timeout_s": "600",
    "restore_interval_s": "10",
    "metrics_port": "9465",
    "stall_exit_s": "300",
    "train_arch": "resnet50",
    "train_pretrained": "false",
    "train_weights": "/models/resnet152-f82ba261.pth",
    "train_image_size": "256",
    "train_batch_size": "32",
    "train_lr": "0.003",
    "train_epochs_frozen": "1",
    "train_epochs_unfrozen": "10",
    "train_patience": "3",
    "train_min_tag_images": "50",
    "train_parity_images": "0",
    "holdout_pct": "5",
    "holdout_seed": "holdout-2025",
    "dataset_query": "SELECT id AS image_id, tags FROM stills WHERE tags <> ''",
    "gate_tolerance": "0.005",
    "threshold_floor": "0.1",
    "threshold_ceiling": "0.6",
    "threshold_min_positives": "20",
    "backfill_query": "SELECT id AS image_id FROM stills",
    "backfill_max_pending": "2000",
    "retag_on_promote": "true",
    "retrain_schedule": "0 2 * * 0",
    "orphan_check_s": "30",
}

# For settings whose Field() carries no description.
DESCRIPTIONS: dict[str, str] = {
    "train_batch_size": "Images per training step.",
    "train_epochs_frozen": "Epochs with the pretrained body frozen (head only).",
    "train_epochs_unfrozen": "Epochs after unfreezing, with discriminative learning rates.",
}


def _cell(text: str) -> str:
    return f"`{text}`".replace("|", "\\|")


def table() -> str:
    missing = sorted(set(Settings.model_fields) - set(EXAMPLES))
    if missing:
        raise SystemExit(f"scripts/settings_table.py: add an example for {', '.join(missing)}")
    rows = ["| variable | default | example | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is PydanticUndefined:
            shown = "*(required)*"
        elif default == "":
            shown = "*(empty)*"
        else:
            shown = _cell(str(default).lower() if isinstance(default, bool) else str(default))
        description = (field.description or DESCRIPTIONS.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {_cell(EXAMPLES[name])} | {description} |")
    return "\n".join(rows)


def write(readme: Path = README) -> None:
    text = readme.read_text()
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise SystemExit(f"{readme} lacks the markers {START} … {END}")
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print or write README.md's settings table.")
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    if parser.parse_args(argv).write:
        write()
    else:
        sys.stdout.write(table() + "\n")


if __name__ == "__main__":
    main()
