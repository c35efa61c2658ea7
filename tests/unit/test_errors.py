"""shared/errors.py: third-party errors become one line naming what to check, passwords hidden."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from shared.config import Settings
from shared.errors import EXIT_FAILURE, EXIT_USAGE, SettingsError, UserError, redact, report, translate
from shared.registry import RegistryError
from training.dataset import DatasetError


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, broker_url="redis://:s3cret@127.0.0.1:1/0",
                    database_url="postgresql+psycopg://app:s3cret@db.example:5432/stilltag")


def line_of(exc: BaseException, **kw) -> tuple[str, int]:
    out = io.StringIO()
    code = report(exc, file=out, **kw)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.startswith("error: "), text
    return text.strip(), code


def test_redact_hides_passwords_only():
    assert redact("redis://:pw@h:1/0 and postgresql://u:p%40ss@h/db") == "redis://:***@h:1/0 and postgresql://u:***@h/db"
    assert redact("redis://h:6379/0 s3://bucket/key") == "redis://h:6379/0 s3://bucket/key"


def test_our_errors_are_user_errors_not_value_errors():
    for cls in (RegistryError, DatasetError, SettingsError):
        assert issubclass(cls, UserError) and not issubclass(cls, ValueError)
    assert SettingsError.exit_code == EXIT_USAGE and RegistryError.exit_code == EXIT_FAILURE


def test_bad_setting_value_names_the_variable(tmp_path):
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, max_batch="abc", threshold=2)
    line, code = line_of(info.value)
    assert line == ("error: invalid setting: STILLTAG_MAX_BATCH='abc': input should be a valid integer, unable to "
                    "parse string as an integer; STILLTAG_THRESHOLD='2': input should be less than 1")
    assert code == EXIT_USAGE


def test_validator_message_is_kept_whole(tmp_path):
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, image_url="s3://stills/image.jpg")
    assert line_of(info.value)[0] == ("error: invalid setting: STILLTAG_IMAGE_URL must contain {image_id}, "
                                      "e.g. s3://stills/{image_id}.jpg")


def test_unreachable_broker_names_the_setting_without_its_password(settings):
    from kombu.exceptions import OperationalError

    exc = OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    line, code = line_of(exc, settings=settings)
    assert line == "error: cannot reach the broker at redis://:***@127.0.0.1:1/0 (STILLTAG_BROKER_URL): Connection refused"
    assert code == EXIT_FAILURE


def test_redis_error_is_matched_to_its_setting(settings):
    import redis

    exc = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    assert str(translate(exc, settings)) == (
        "cannot reach Redis at redis://:***@127.0.0.1:1/0 (STILLTAG_BROKER_URL): Connection refused")
    other = redis.ConnectionError("Error 111 connecting to 10.0.0.9:6379. Connection refused.")
    assert "at 10.0.0.9:6379 (check STILLTAG_BROKER_URL and STILLTAG_EVENTS_URL)" in str(translate(other, settings))


def test_wrapped_error_is_found_through_its_cause(settings):
    import redis

    try:
        try:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        except redis.ConnectionError as inner:
            raise RuntimeError("publish failed") from inner
    except RuntimeError as outer:
        assert "cannot reach Redis" in str(translate(outer, settings))


def test_database_errors(settings):
    import sqlalchemy as sa

    unreachable = sa.create_engine("postgresql+psycopg://app:s3cret@127.0.0.1:1/x")
    with pytest.raises(sa.exc.OperationalError) as info:
        unreachable.connect()
    line = line_of(info.value, settings=settings)[0]
    assert line.startswith("error: cannot reach the database at postgresql+psycopg://app:***@db.example:5432/stilltag "
                           "(STILLTAG_DATABASE_URL): connection failed:")
    assert "s3cret" not in line

    empty = sa.create_engine("sqlite://")
    with pytest.raises(sa.exc.OperationalError) as info, empty.connect() as conn:
        conn.execute(sa.text("SELECT * FROM model_versions"))
    assert "run `stilltag db upgrade` (no such table: model_versions)" in line_of(info.value, settings=settings)[0]

    with pytest.raises(sa.exc.ArgumentError) as info:
        sa.create_engine("not a url")
    assert line_of(info.value, settings=settings) == (
        "error: STILLTAG_DATABASE_URL is not a database URL SQLAlchemy can use: "
        "Could not parse SQLAlchemy URL from given URL string", EXIT_USAGE)


def test_s3_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line_of(NoCredentialsError())[0]
    assert line_of(EndpointConnectionError(endpoint_url="http://minio:9000/models"))[0] == (
        "error: cannot reach the S3 endpoint http://minio:9000/models (STILLTAG_S3_ENDPOINT_URL): "
        'Could not connect to the endpoint URL: "http://minio:9000/models"')
    missing = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The bucket does not exist"}}, "PutObject")
    assert line_of(missing)[0] == ("error: S3 refused PutObject: NoSuchBucket (The bucket does not exist); "
                                   "check the bucket in STILLTAG_MODEL_STORE / STILLTAG_IMAGE_URL")


def test_missing_file():
    with pytest.raises(FileNotFoundError) as info:
        open("/nonexistent/export.pkl", "rb")
    assert line_of(info.value) == ("error: No such file or directory: /nonexistent/export.pkl", EXIT_FAILURE)


def test_unknown_error_is_one_line_with_a_hint_and_a_traceback_under_debug():
    exc = KeyError("boom")
    assert translate(exc) is None
    assert line_of(exc) == ("error: unexpected KeyError: 'boom' (run `stilltag --debug ...` for the traceback)",
                            EXIT_FAILURE)
    try:
        raise RegistryError("no model version 'v9'\nsecond line")
    except RegistryError as raised:
        out = io.StringIO()
        assert report(raised, debug=True, file=out) == EXIT_FAILURE
    lines = out.getvalue().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "error: no model version 'v9' second line"
