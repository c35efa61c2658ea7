"""README.md keeps up with the code: settings, commands, Quick start, the enqueue snippet."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shlex
import uuid
from pathlib import Path

import pytest

from shared.config import ENV_PREFIX, Settings
from shared.constants import BACKFILL_QUEUE, TAG_TASK, TAGGED_CHANNEL, TAGGING_QUEUE
from shared.messages import check_envelope, decode_body, parse_tag_request
from tests.unit.test_compose import resolve_command

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match[1]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def load_settings_table():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_documented():
    missing = [ENV_PREFIX + name.upper() for name in Settings.model_fields if f"`{ENV_PREFIX}{name.upper()}`" not in README]
    assert not missing, f"README.md does not document {missing}: run scripts/settings_table.py --write"


def test_settings_table_is_current():
    settings_table = load_settings_table()
    assert f"{settings_table.START}\n{settings_table.table()}\n{settings_table.END}" in README, (
        "README.md's configuration table is stale: uv run python scripts/settings_table.py --write"
    )


def test_settings_examples_parse(tmp_path):
    examples = dict(load_settings_table().EXAMPLES)
    examples.pop("data_dir")
    Settings(data_dir=tmp_path, **{name: value for name, value in examples.items()})


def test_readme_names_no_unknown_setting():
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    named = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b", README))
    assert named <= known, f"README.md names settings that do not exist: {sorted(named - known)}"


def test_quick_start_is_two_commands_that_exist():
    blocks = code_blocks(section("Quick start"), "bash")
    assert len(blocks) == 1
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    for command in commands:
        path = ROOT / command
        assert path.is_file() and os.access(path, os.X_OK), f"{command} is missing or not executable"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in ci
    assert ci.rstrip().splitlines()[-1] == "./scripts/test"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def readme_stilltag_invocations() -> list[list[str]]:
    """Arguments after ``stilltag`` in every shell line of the README that runs it."""
    found = []
    for block in code_blocks(README, "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                # `uv run stilltag ...`, or `docker compose run ... cli ...` (the image's entrypoint)
                if word == "stilltag" and words[i - 1 : i] == ["run"] or word == "cli" and "compose" in words:
                    args = words[i + 1 :]
                    found.append(args[: args.index("&")] if "&" in args else args)
                    break
    return found


def test_readme_shell_commands_exist(tmp_path):
    invocations = readme_stilltag_invocations()
    assert ["models", "register", "export.pkl", "--promote"] in invocations
    learner = tmp_path / "export.pkl"  # `models register` checks that its file exists
    learner.write_bytes(b"")
    for args in invocations:
        if args != ["--help"]:
            resolve_command([str(learner) if a.endswith(".pkl") else a for a in args])


def test_commands_table_names_real_commands():
    cells = re.findall(r"^\| (`stilltag .*?) \|", section("Commands"), flags=re.M)
    assert len(cells) >= 10
    missing = []
    for cell in cells:
        for usage in re.findall(r"`(?:stilltag )?([^`]+)`", cell):
            words = []
            for word in usage.split():  # the command's path ends at the first placeholder or option
                if not re.fullmatch(r"[a-z][a-z-]*", word):
                    break
                words.append(word)
            try:
                resolve_command(words, parse=False)
            except AssertionError:
                missing.append(" ".join(words))
    assert not missing, f"README.md's Commands table names commands that do not exist: {missing}"


def test_ruby_enqueue_builds_the_envelope_workers_accept():
    ruby = code_blocks(section("The contract with the website"), "ruby")[0]
    for needed in (
        '"content-type": "application/json"', '"content-encoding": "utf-8"', f'task: "{TAG_TASK}"',
        "id: task_id", "delivery_tag: SecureRandom.uuid", 'delivery_info: { exchange: "", routing_key: queue }',
        'body_encoding: "base64"', "Base64.strict_encode64(JSON.generate(body))",
        "[[image_id], {}, { callbacks: nil, errbacks: nil, chain: nil, chord: nil }]",
        "redis.lpush(queue, JSON.generate(message))", f'queue: "{TAGGING_QUEUE}"', f'queue: "{BACKFILL_QUEUE}"',
    ):
        assert needed in ruby, f"the Ruby snippet lost {needed!r}"
    # The same envelope, built in Python, passes the workers' checks.
    task_id = str(uuid.uuid4())
    body = [[42], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"lang": "py", "task": TAG_TASK, "id": task_id, "root_id": task_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "(42,)",
                    "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_tag": str(uuid.uuid4()),
                       "delivery_info": {"exchange": "", "routing_key": TAGGING_QUEUE},
                       "priority": 0, "body_encoding": "base64"},
    }
    envelope, reason = check_envelope(json.dumps(message))
    assert reason is None
    assert parse_tag_request(envelope["headers"]["task"], decode_body(envelope)) == 42


def test_ruby_subscriber_listens_on_the_channel():
    ruby = code_blocks(section("The contract with the website"), "ruby")[1]
    assert f'subscribe("{TAGGED_CHANNEL}")' in ruby


@pytest.mark.parametrize("title", ["Retraining", "Delivery guarantees and bad messages", "Benchmarks", "Demo output"])
def test_sections_exist(title):
    section(title)
