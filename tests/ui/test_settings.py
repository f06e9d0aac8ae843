"""`OPSLOOP_UI_*` settings: defaults that match the workspace, one-line errors, store variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsloop.errors import ConfigError
from opsloop.ui.settings import DEFAULT_PORT, load_ui_settings


def test_defaults_point_at_the_workspace_stores(ui_env: Path) -> None:
    settings = load_ui_settings(server_url="http://127.0.0.1:8000/", monitor_url="none")
    assert (settings.host, settings.port) == ("127.0.0.1", DEFAULT_PORT)
    assert settings.server_url == "http://127.0.0.1:8000"  # the trailing slash is dropped
    assert not settings.monitor_enabled
    root = ui_env.resolve()
    assert settings.resolved_tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    assert settings.resolved_predlog_url() == f"sqlite:///{root / 'predictions.db'}"
    assert settings.resolved_loop_db_url() == f"sqlite:///{root / 'loop.db'}"
    assert settings.resolved_bundle_path() == ui_env / "bundles" / "digits-cnn"


def test_each_store_follows_its_own_variable_unless_the_app_sets_one(
    ui_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSLOOP_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "postgresql://u@db/log")
    monkeypatch.setenv("OPSLOOP_LOOP_DB_URL", "postgresql://u@db/loop")
    settings = load_ui_settings()
    assert settings.resolved_tracking_uri() == "http://mlflow:5000"
    assert settings.resolved_predlog_url() == "postgresql://u@db/log"
    assert settings.resolved_loop_db_url() == "postgresql://u@db/loop"
    monkeypatch.setenv("OPSLOOP_UI_PREDLOG_URL", "sqlite:///elsewhere.db")
    assert load_ui_settings().resolved_predlog_url() == "sqlite:///elsewhere.db"
    # A server whose log is off leaves the app on the workspace's log, not on "none".
    monkeypatch.delenv("OPSLOOP_UI_PREDLOG_URL")
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "none")
    assert load_ui_settings().resolved_predlog_url().endswith("predictions.db")


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("OPSLOOP_UI_PORT", "0", "OPSLOOP_UI_PORT='0' is invalid"),
        ("OPSLOOP_UI_SERVER_URL", "127.0.0.1:8000", "OPSLOOP_UI_SERVER_URL='127.0.0.1:8000'"),
        ("OPSLOOP_UI_MONITOR_URL", "ftp://x", "use the monitor's base URL"),
        ("OPSLOOP_UI_DRIFT_WINDOW", "1", "use 2 or more predictions"),
        ("OPSLOOP_UI_LOG_LEVEL", "loud", "unknown log level 'loud'"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it_and_the_fix(
    ui_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=named) as caught:
        load_ui_settings()
    assert "\n" not in str(caught.value)


def test_settings_are_read_once_per_process(ui_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opsloop.ui.settings import get_settings

    first = get_settings()
    monkeypatch.setenv("OPSLOOP_UI_PORT", "9999")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().port == 9999
