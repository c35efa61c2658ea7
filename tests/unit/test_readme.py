"""README.md keeps up with the code: settings, commands, Quick start, the enqueue snippet."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shlex
import time
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
                if (word == "stilltag" and words[i - 1 : i] == ["run"]) or (word == "cli" and "compose" in words):
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


def ruby_literal(source: str, names: dict) -> object:
    """Evaluate a Ruby hash/array literal of the README's snippet as Python, with ``names`` bound.

    Only what the snippet uses is translated: ``key:`` symbol keys, ``nil``, ``"#{var}"``
    interpolation, ``Base64.strict_encode64(JSON.generate(x))`` / ``SecureRandom.uuid`` /
    ``Time.now.to_f`` calls, and end-of-line comments.
    """
    source = re.sub(r"\s+#\s[^\n]*", "", source)  # comments ("#{" interpolation has no space after #)
    source = source.replace("Time.now.to_f", "_now()")
    py = source.replace("Base64.strict_encode64(JSON.generate(", "_b64json((").replace("SecureRandom.uuid", "_uuid()")
    py = re.sub(r"#\{(\w+)\}", r'" + str(\1) + "', py)
    py = re.sub(r'(?<![\w"])(\w+): ', r'"\1": ', py)  # symbol keys; "content-type": is already a string
    py = re.sub(r"\bnil\b", "None", py)
    scope = {"_b64json": lambda x: base64.b64encode(json.dumps(x).encode()).decode(), "_uuid": lambda: str(uuid.uuid4()),
             "_now": time.time}
    return eval(py, scope, dict(names))


def test_ruby_enqueue_builds_the_envelope_workers_accept():
    ruby = code_blocks(section("The contract with the website"), "ruby")[0]
    body_src = re.search(r"^ *body = (\[.*\])$", ruby, flags=re.M)[1]
    message_src = re.search(r"^( *)message = (\{.*?^\1\})", ruby, flags=re.M | re.S)[2]
    assert "redis.lpush(queue, JSON.generate(message))" in ruby, "the Ruby snippet no longer pushes the message"
    assert re.search(rf'def stilltag_enqueue\(redis, image_id, queue: "{TAGGING_QUEUE}"\)', ruby)
    assert f'queue: "{BACKFILL_QUEUE}"' in ruby
    # The envelope the Ruby code builds, evaluated: the workers' own checks accept it.
    task_id = str(uuid.uuid4())
    body = ruby_literal(body_src, {"image_id": 42})
    for queue in (TAGGING_QUEUE, BACKFILL_QUEUE):
        message = ruby_literal(message_src, {"image_id": 42, "task_id": task_id, "queue": queue, "body": body})
        envelope, reason = check_envelope(json.dumps(message))
        assert reason is None, f"the README's Ruby envelope is refused: {reason}"
        assert (envelope["headers"]["task"], envelope["headers"]["id"]) == (TAG_TASK, task_id)
        assert envelope["properties"]["delivery_info"]["routing_key"] == queue
        assert parse_tag_request(envelope["headers"]["task"], decode_body(envelope)) == 42


def test_ruby_subscriber_listens_on_the_channel():
    ruby = code_blocks(section("The contract with the website"), "ruby")[1]
    assert f'subscribe("{TAGGED_CHANNEL}")' in ruby


def test_retraining_section_states_the_real_defaults():
    from training.lock import LOCK_TTL_S

    text = " ".join(section("Retraining").split())
    defaults = Settings.model_fields
    assert f"The default, `{defaults['retrain_schedule'].default}`, means 03:00" in text
    assert f"({defaults['holdout_pct'].default} % by default)" in text
    assert f"`STILLTAG_TRAIN_ARCH` ({defaults['train_arch'].default})" in text
    assert f"`STILLTAG_GATE_TOLERANCE` (default {defaults['gate_tolerance'].default:g})" in text
    assert f"expires within {LOCK_TTL_S // 60} minutes" in text
    assert f"every `STILLTAG_ORPHAN_CHECK_S` ({defaults['orphan_check_s'].default:g} s)" in text
    assert f"within about {(LOCK_TTL_S + 2 * defaults['orphan_check_s'].default) / 60:g} minutes of the death" in text
    assert "F2 (samples-averaged, at `STILLTAG_THRESHOLD`)" in text


def test_delivery_section_states_the_real_defaults():
    text = " ".join(section("Delivery guarantees and bad messages").split())
    defaults = Settings.model_fields
    timeout_s, interval_s = defaults["visibility_timeout_s"].default, defaults["restore_interval_s"].default
    assert f"({timeout_s} s and {interval_s:g} s)" in text


@pytest.mark.parametrize("title", ["Benchmarks", "Demo output"])
def test_sections_exist(title):
    assert section(title).strip()
