import pytest

from shared.config import Settings, load_settings, unknown_env_names
from shared.errors import SettingsError


def test_embedded_defaults_need_no_server(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert s.broker_url == "filesystem://"
    assert s.database_url == f"sqlite:///{tmp_path}/stilltag.db"
    assert s.image_url == f"file://{tmp_path}/images/{{image_id}}.jpg"
    assert s.model_store == f"file://{tmp_path}/models"
    assert s.events_url == ""
    assert (s.threshold, s.max_batch, s.max_wait_ms, s.top_k) == (0.2, 64, 50, 10)


def test_environment_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("STILLTAG_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("STILLTAG_MAX_BATCH", "8")
    s = load_settings(data_dir=tmp_path)
    assert s.max_batch == 8
    assert s.events_url == "redis://127.0.0.1:6379/3"


def test_misspelled_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("STILLTAG_MAX_BACTH", "8")
    assert unknown_env_names() == ["STILLTAG_MAX_BACTH"]
    with pytest.raises(SettingsError, match=r"STILLTAG_MAX_BACTH \(did you mean STILLTAG_MAX_BATCH\?\)"):
        load_settings()


def test_image_url_needs_placeholder(tmp_path):
    with pytest.raises(ValueError, match=r"must contain \{image_id\}"):
        Settings(data_dir=tmp_path, image_url="s3://stills/image.jpg")


@pytest.mark.parametrize("url", ["sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380", "sentinel://s1:26379/0"])
def test_sentinel_urls_are_refused_with_the_way_out(tmp_path, url):
    with pytest.raises(ValueError, match=r"Sentinel URLs are not supported.*proxy that follows failover"):
        Settings(data_dir=tmp_path, broker_url=url)


def test_a_broker_stilltag_cannot_guard_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"must be redis://, rediss:// or filesystem://"):
        Settings(data_dir=tmp_path, broker_url="amqp://guest@127.0.0.1//")


def test_tls_redis_is_redis(tmp_path):
    """rediss:// gets every Redis-only feature (the envelope guard included), as redis:// does."""
    from shared.broker import GUARDED_REDIS_TRANSPORT, transport_class

    s = Settings(data_dir=tmp_path, broker_url="rediss://:pw@redis.example:6380/0")
    assert s.broker_is_redis and s.events_url == s.broker_url
    assert transport_class(s) == GUARDED_REDIS_TRANSPORT
