"""The lanes of ``pytest -n 2`` (tests/conftest.py): an entry that no longer names a test would
quietly move nothing; each one must name a folder, a file or a test function that exists."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import APART, lane

ROOT = Path(__file__).resolve().parents[2]


def test_every_apart_entry_names_something_that_exists():
    for entry in APART:
        path, _, name = entry.partition("::")
        assert (ROOT / path).exists(), f"{entry}: no {path}"
        if name:
            functions = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in functions, f"{entry}: {path} defines no {name}"


def test_a_test_on_the_machine_s_redis_runs_in_the_shared_lane():
    assert lane("tests/e2e/test_backfill.py::test_backfill_tags_every_image_once_and_keeps_the_queue_bounded") == "shared"
    assert lane("tests/e2e/test_backfill.py::test_backfill_survives_a_redis_outage") == "apart"
    assert lane("tests/e2e/test_fault_drill.py::test_fault_drill") == "apart"
    assert lane("tests/unit/test_lanes.py::test_a_test_on_the_machine_s_redis_runs_in_the_shared_lane") == "apart"
