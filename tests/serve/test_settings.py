"""Serving settings: OPSLOOP_* variables, defaults, and one-line start-up errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsloop.cli import main
from opsloop.errors import ConfigError
from opsloop.serve.settings import get_settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("OPSLOOP_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()


def test_defaults_serve_the_registry_champion_on_localhost(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path)
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert settings.bundle_path is None
    assert settings.describe_source() == "registry model digits-cnn@champion"
    assert settings.access_log is False
    assert settings.predlog_enabled
    assert settings.resolved_predlog_url() == f"sqlite:///{tmp_path.resolve() / 'predictions.db'}"


def test_environment_variables_configure_everything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPSLOOP_PORT", "9001")
    monkeypatch.setenv("OPSLOOP_WORKERS", "2")
    monkeypatch.setenv("OPSLOOP_BUNDLE_PATH", str(tmp_path))
    monkeypatch.setenv("OPSLOOP_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("OPSLOOP_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "none")
    monkeypatch.setenv("OPSLOOP_ACCESS_LOG", "true")
    settings = get_settings()
    assert (settings.port, settings.workers, settings.max_batch_size) == (9001, 2, 64)
    assert settings.bundle_path == tmp_path
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert not settings.predlog_enabled
    assert settings.access_log
    assert get_settings() is settings  # read once


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OPSLOOP_PORT", "eighty", r"OPSLOOP_PORT='eighty' is invalid: .*use a TCP port"),
        ("OPSLOOP_PORT", "70000", r"OPSLOOP_PORT='70000' is invalid"),
        ("OPSLOOP_WORKERS", "0", r"OPSLOOP_WORKERS='0' is invalid: .*worker processes"),
        ("OPSLOOP_MAX_BATCH_SIZE", "0", r"OPSLOOP_MAX_BATCH_SIZE='0'"),
        ("OPSLOOP_MAX_BATCH_WAIT_MS", "-1", r"OPSLOOP_MAX_BATCH_WAIT_MS='-1'"),
        ("OPSLOOP_PREDLOG_URL", "not a url", r"OPSLOOP_PREDLOG_URL='not a url' .*SQLAlchemy URL"),
        ("OPSLOOP_LOG_LEVEL", "loud", r"OPSLOOP_LOG_LEVEL='loud' .*unknown log level"),
    ],
)
def test_bad_values_fail_with_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message) as caught:
        get_settings()
    assert "\n" not in str(caught.value)


def test_serve_refuses_a_missing_bundle_before_starting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "none")
    code = main(["serve", "--bundle", str(tmp_path / "missing"), "--port", "8765"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: OPSLOOP_BUNDLE_PATH=")
    assert "opsloop export" in err


def test_serve_refuses_a_bad_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPSLOOP_MAX_PAYLOAD_BYTES", "12")
    assert main(["serve"]) == 2
    assert "OPSLOOP_MAX_PAYLOAD_BYTES='12' is invalid" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "none")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--bundle", str(tiny_bundle), "--port", str(port)])
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_rejected_url_setting_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(predlog_url="postgresql://opsloop:hunter2@db:notaport/log")
    assert "OPSLOOP_PREDLOG_URL=" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "opsloop:***@db" in str(caught.value)


@pytest.mark.parametrize(
    ("given", "read"),
    [("auto", "auto"), ("true", "true"), ("1", "true"), ("on", "true"), ("false", "false"),
     ("No", "false")],
)  # fmt: skip
def test_the_inference_thread_is_auto_or_a_boolean(given: str, read: str) -> None:
    assert load_settings(inference_thread=given).inference_thread == read


def test_an_unknown_inference_thread_value_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"OPSLOOP_INFERENCE_THREAD='maybe'.*auto, true or false"):
        load_settings(inference_thread="maybe")
