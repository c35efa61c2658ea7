"""One way to fail: every error a user causes or meets becomes one line saying what to check.

Our own user-facing errors derive from ``UserError``; ``translate`` turns the third-party
errors a user meets (a bad setting, an unreachable broker, database or S3 endpoint, a missing
file) into one. ``report`` writes the line (and, with ``debug``, the traceback first) and
returns the exit status. Any entry point uses it the same way::

    try:
        run()
    except Exception as exc:
        raise SystemExit(report(exc, debug=debug)) from None

Exit status: 2 (``EXIT_USAGE``) when the command or its settings must change before it can
work, as click uses 2 for a bad command line; 1 (``EXIT_FAILURE``) for everything that failed
while running (a server away, a missing file, a refused registry operation, a bug).

Third-party exception classes are looked up in ``sys.modules`` only: an exception from a
library that was never imported cannot occur, so reporting an error imports nothing heavy.
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from shared.config import Settings

EXIT_FAILURE = 1  # it failed while running
EXIT_USAGE = 2  # the command line or the settings must change (click's status for usage errors)

DEBUG_HINT = "run `stilltag --debug ...` for the traceback"
ENV_PREFIX = "STILLTAG_"  # shared.config takes it from here (config imports errors, not the reverse)
MAX_VALUE_CHARS = 80  # a setting's value is quoted up to this length
CAUSE_DEPTH = 5  # how far down __cause__ / __context__ to look for an error we know

# scheme://user:password@host -> scheme://user:***@host
_PASSWORD_IN_URL = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@\s]*@")
# redis-py: "Error 111 connecting to 127.0.0.1:1. Connection refused."
_REDIS_CONNECT = re.compile(r"^Error -?\d+ connecting to (?P<addr>\S+?)\.\s+(?P<reason>.*?)\.?$")
_TABLE_MISSING_SQLSTATES = {"42P01", "42703"}  # PostgreSQL: undefined table, undefined column
_S3_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_S3_STORE_HINT = "STILLTAG_MODEL_STORE / STILLTAG_IMAGE_URL"


class UserError(Exception):
    """A failure the user causes or meets; its message is one line saying what to check."""

    exit_code = EXIT_FAILURE


class SettingsError(UserError):
    """A setting is wrong or unknown: nothing runs until it is changed."""

    exit_code = EXIT_USAGE


def redact(text: str) -> str:
    """``text`` with the passwords of any URLs in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1:***@", text)


def one_line(text: str) -> str:
    """``text`` on one line, passwords hidden."""
    return redact(" ".join(text.split()))


def translate(exc: BaseException, settings: Settings | None = None) -> UserError | None:
    """The user-facing error for ``exc``, or None when it is not one we know (a bug, probably).

    Args:
        exc: what was raised. Its ``__cause__``/``__context__`` chain is searched too.
        settings: to name the URL that failed; the process's settings when None (if they load).
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < CAUSE_DEPTH:
        if isinstance(current, UserError):
            return current
        for translator in _TRANSLATORS:
            found = translator(current, settings)
            if found is not None:
                found.__cause__ = current
                return found
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        seen += 1
    return None


def report(exc: BaseException, *, debug: bool = False, settings: Settings | None = None,
           file: TextIO | None = None, hint: str = DEBUG_HINT) -> int:
    """Write ``exc`` as one ``error: ...`` line (after its traceback when ``debug``).

    Args:
        exc: what was raised.
        debug: print the full traceback first.
        settings: passed to ``translate``.
        file: where to write; stderr when None.
        hint: appended to the line for an error we do not know (a bug), where --debug helps.

    Returns:
        The exit status: ``EXIT_USAGE`` for settings errors, ``EXIT_FAILURE`` otherwise.
    """
    file = sys.stderr if file is None else file
    if debug:
        traceback.print_exception(exc, file=file)
    known = translate(exc, settings)
    if known is not None:
        print(f"error: {one_line(str(known))}", file=file, flush=True)
        return known.exit_code
    detail = one_line(str(exc))
    name = type(exc).__qualname__
    line = f"error: unexpected {name}: {detail}" if detail else f"error: unexpected {name}"
    print(f"{line} ({hint})" if hint and not debug else line, file=file, flush=True)
    return EXIT_FAILURE


# --- translators: each returns a UserError for the exceptions it knows, else None ---------


def _module_class(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _is(exc: BaseException, module: str, *names: str) -> bool:
    classes = tuple(c for c in (_module_class(module, n) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(exc, classes)


def _settings(settings: Settings | None) -> Settings | None:
    if settings is not None:
        return settings
    try:
        from shared.config import get_settings

        return get_settings()
    except Exception:  # the settings are what failed: the message names no URL then
        return None


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _quote_value(value: object) -> str:
    text = redact(str(value))
    if len(text) > MAX_VALUE_CHARS:
        text = text[: MAX_VALUE_CHARS - 1] + "…"
    return repr(text)


def _settings_validation(exc: BaseException, _settings_arg) -> UserError | None:
    if not _is(exc, "pydantic_core", "ValidationError") or getattr(exc, "title", "") != "Settings":
        return None
    problems = []
    for err in exc.errors():  # type: ignore[attr-defined]  # pydantic's ValidationError, checked above
        msg = err.get("msg", "")
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        loc = [str(part) for part in err.get("loc", ())]
        if not loc or msg.startswith(ENV_PREFIX):  # a validator's message names the setting itself
            problems.append(msg)
            continue
        name = _env_name(loc[0]) + "".join(f"[{part}]" for part in loc[1:])
        if err.get("type") == "extra_forbidden":
            problems.append(f"{name} is not a setting")
        elif isinstance(err.get("input"), (str, int, float, bool)):
            problems.append(f"{name}={_quote_value(err['input'])}: {msg[:1].lower()}{msg[1:]}")
        else:
            problems.append(f"{name}: {msg[:1].lower()}{msg[1:]}")
    return SettingsError("invalid setting: " + "; ".join(problems))


def _redis_reason(exc: BaseException) -> tuple[str, str]:
    """``(host:port or "", reason)`` from a redis-py/kombu connection error message."""
    text = one_line(str(exc))
    match = _REDIS_CONNECT.match(text)
    if match:
        return match["addr"], match["reason"]
    return "", text.rstrip(".") or type(exc).__name__


def _host_port(url: str) -> str:
    from urllib.parse import urlparse

    try:
        parsed = urlparse(url)
        return f"{parsed.hostname}:{parsed.port or 6379}"
    except ValueError:
        return ""


def _broker(exc: BaseException, settings_arg) -> UserError | None:
    if not _is(exc, "kombu.exceptions", "OperationalError"):
        return None
    settings = _settings(settings_arg)
    url = redact(settings.broker_url) if settings else "its URL"
    _, reason = _redis_reason(exc)
    return UserError(f"cannot reach the broker at {url} (STILLTAG_BROKER_URL): {reason}")


def _redis(exc: BaseException, settings_arg) -> UserError | None:
    if not _is(exc, "redis.exceptions", "ConnectionError", "TimeoutError"):
        return None
    addr, reason = _redis_reason(exc)
    settings = _settings(settings_arg)
    candidates = []
    if settings is not None:
        candidates = [("STILLTAG_BROKER_URL", settings.broker_url), ("STILLTAG_EVENTS_URL", settings.events_url)]
        candidates = [(name, url) for name, url in candidates if url.startswith(("redis://", "rediss://"))]
    for name, url in candidates:
        if addr and _host_port(url) == addr:
            return UserError(f"cannot reach Redis at {redact(url)} ({name}): {reason}")
    where = f" at {addr}" if addr else ""
    return UserError(f"cannot reach Redis{where} (check STILLTAG_BROKER_URL and STILLTAG_EVENTS_URL): {reason}")


def _database(exc: BaseException, settings_arg) -> UserError | None:
    if _is(exc, "sqlalchemy.exc", "NoSuchModuleError") or (
        _is(exc, "sqlalchemy.exc", "ArgumentError") and "URL" in str(exc)
    ):
        return SettingsError(f"STILLTAG_DATABASE_URL is not a database URL SQLAlchemy can use: {one_line(str(exc))}")
    if not _is(exc, "sqlalchemy.exc", "OperationalError", "ProgrammingError"):
        return None
    settings = _settings(settings_arg)
    url = f"at {redact(settings.database_url)} " if settings else ""
    orig = getattr(exc, "orig", None) or exc
    reason = _driver_reason(orig)
    if getattr(orig, "sqlstate", None) in _TABLE_MISSING_SQLSTATES or "no such table" in reason or (
        "no such column" in reason
    ):
        return UserError(f"the database {url}(STILLTAG_DATABASE_URL) lacks stilltag's tables or has an old "
                         f"schema: run `stilltag db upgrade` ({reason})")
    if "unable to open database file" in reason:  # SQLite: the file or its folder is not there
        return UserError(f"cannot open the database {url}(STILLTAG_DATABASE_URL): {reason}; "
                         "`stilltag db upgrade` creates it")
    if _is(exc, "sqlalchemy.exc", "OperationalError"):
        return UserError(f"cannot reach the database {url}(STILLTAG_DATABASE_URL): {reason}")
    return None  # another ProgrammingError is a bug in our SQL (or in STILLTAG_DATASET_QUERY's: DatasetError)


def _driver_reason(orig: BaseException) -> str:
    """The driver's message without PostgreSQL's hints and query excerpts (its first line, or the
    list after a first line ending in ':', as psycopg writes when it tried several addresses)."""
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    if not lines:
        return type(orig).__name__
    if not lines[0].endswith(":"):
        return one_line(lines[0])
    return one_line(" ".join(line for line in lines if not line.startswith(("Is the server", "HINT:"))))


def _s3(exc: BaseException, _settings_arg) -> UserError | None:
    module = "botocore.exceptions"
    if _is(exc, module, "NoCredentialsError", "PartialCredentialsError"):
        return UserError(f"no usable AWS credentials for S3 ({_S3_STORE_HINT} name s3:// URLs): set "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if _is(exc, module, "NoRegionError"):
        return UserError(f"no AWS region for S3 ({_S3_STORE_HINT} name s3:// URLs): set AWS_DEFAULT_REGION")
    if _is(exc, module, "EndpointConnectionError", "ConnectTimeoutError"):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "")
        return UserError(f"cannot reach the S3 endpoint {redact(endpoint)} (STILLTAG_S3_ENDPOINT_URL): "
                         f"{one_line(str(exc))}")
    if _is(exc, module, "ClientError"):
        error = getattr(exc, "response", {}).get("Error", {})
        code, message = error.get("Code", "?"), one_line(error.get("Message", ""))
        operation = getattr(exc, "operation_name", "a request")
        if code in _S3_CREDENTIAL_CODES:
            check = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and STILLTAG_S3_ENDPOINT_URL)"
        elif code == "NoSuchBucket":
            check = f"check the bucket in {_S3_STORE_HINT}"
        elif code in ("AccessDenied", "403"):
            check = f"check that the AWS credentials may use the bucket in {_S3_STORE_HINT}"
        else:
            check = f"check {_S3_STORE_HINT} and STILLTAG_S3_ENDPOINT_URL"
        return UserError(f"S3 refused {operation}: {code}{f' ({message})' if message else ''}; {check}")
    return None


def _file(exc: BaseException, _settings_arg) -> UserError | None:
    if not isinstance(exc, OSError) or exc.filename is None:
        return None
    reason = exc.strerror or type(exc).__name__
    return UserError(f"{reason}: {exc.filename}")


_TRANSLATORS = (_settings_validation, _broker, _redis, _database, _s3, _file)
