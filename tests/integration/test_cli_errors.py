"""The real ``stilltag`` command fails in one line on stderr, with no traceback unless --debug."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.stack import stilltag as run_stilltag
from shared.config import ENV_PREFIX

pytestmark = pytest.mark.integration

CLOSED_PORT = 1  # nothing listens on port 1


def stilltag(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``stilltag ARGS`` in its own process with only ``env`` set among the ``STILLTAG_*`` names."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    base[ENV_PREFIX + "DATA_DIR"] = str(tmp_path / "data")
    return run_stilltag(base | env, *args, check=False, timeout_s=120, cwd=tmp_path)


def one_line_failure(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unreachable_broker(tmp_path):
    url = f"redis://:s3cret@127.0.0.1:{CLOSED_PORT}/0"
    line = one_line_failure(stilltag(tmp_path, "enqueue", "5", STILLTAG_BROKER_URL=url), 1)
    assert line == (f"error: cannot reach the broker at redis://:***@127.0.0.1:{CLOSED_PORT}/0 "
                    "(STILLTAG_BROKER_URL): Connection refused")


def test_unreachable_database(tmp_path):
    url = f"postgresql+psycopg://stilltag:s3cret@127.0.0.1:{CLOSED_PORT}/stilltag"
    line = one_line_failure(stilltag(tmp_path, "models", "list", STILLTAG_DATABASE_URL=url), 1)
    assert line.startswith(f"error: cannot reach the database at postgresql+psycopg://stilltag:***@127.0.0.1:"
                           f"{CLOSED_PORT}/stilltag (STILLTAG_DATABASE_URL): ")
    assert "Connection refused" in line and "s3cret" not in line


def test_database_without_tables(tmp_path, pg_url):
    line = one_line_failure(stilltag(tmp_path, "models", "list", STILLTAG_DATABASE_URL=pg_url), 1)
    assert "run `stilltag db upgrade`" in line


def test_bad_setting_value(tmp_path):
    line = one_line_failure(stilltag(tmp_path, "models", "list", STILLTAG_MAX_BATCH="abc"), 2)
    assert line == ("error: invalid setting: STILLTAG_MAX_BATCH='abc': input should be a valid integer, "
                    "unable to parse string as an integer")


def test_bad_decode_priority_says_what_it_takes(tmp_path):
    line = one_line_failure(stilltag(tmp_path, "models", "list", STILLTAG_DECODE_NICE="lowest"), 2)
    assert line == "error: invalid setting: STILLTAG_DECODE_NICE must be a niceness from 0 to 19, or idle"


def test_unknown_setting(tmp_path):
    line = one_line_failure(stilltag(tmp_path, "models", "list", STILLTAG_MAX_BACTH="8"), 2)
    assert line.startswith("error: unknown setting(s) STILLTAG_MAX_BACTH (did you mean STILLTAG_MAX_BATCH?)")


def test_missing_file(tmp_path):
    line = one_line_failure(stilltag(tmp_path, "models", "register", "/nonexistent"), 1)
    assert line == "error: /nonexistent is not a file; pass the export.pkl written by learn.export()"


def test_debug_shows_the_traceback(tmp_path):
    result = stilltag(tmp_path, "--debug", "models", "list", STILLTAG_MAX_BATCH="abc")
    assert result.returncode == 2
    assert "Traceback (most recent call last):" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: invalid setting: STILLTAG_MAX_BATCH='abc'")


@pytest.mark.parametrize("delay_s", [0.2, 0.7, 1.5, 3.0])
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(tmp_path, delay_s):
    """Ctrl-C while the command line is still loading (imports take about a second), while it reads
    the IDs, or once it runs: never a traceback."""
    import shutil
    import signal
    import time

    exe = shutil.which("stilltag")
    assert exe, "the stilltag console script is on PATH (uv run)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env[ENV_PREFIX + "DATA_DIR"] = str(tmp_path / "data")
    env[ENV_PREFIX + "BROKER_URL"] = f"redis://127.0.0.1:{CLOSED_PORT}/0"
    # Ctrl-C's default disposition, whatever this run inherited: a shell without job control
    # starts a background job (`./scripts/test &`) with SIGINT ignored, and its children with it.
    proc = subprocess.Popen([exe, "backfill", "--ids", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "Traceback" not in err + out, err
    assert len(err.splitlines()) <= 1, err


def test_a_command_that_loads_a_learner_prints_only_what_it_did(tmp_path, tiny_learner):
    """No dependency's deprecation warning on stderr: importing fastai scripts functions with the
    deprecated torch.jit.script, which warned on every command that loads a learner."""
    assert stilltag(tmp_path, "db", "upgrade").returncode == 0
    done = stilltag(tmp_path, "models", "register", str(tiny_learner), "--promote")
    assert done.returncode == 0, done.stderr
    assert "registered v1" in done.stdout and "as champion" in done.stdout
    assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr, done.stderr
