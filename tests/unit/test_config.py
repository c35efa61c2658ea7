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
