"""The monitoring service in-process: settings, checks and their failures, the HTTP routes."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from opsloop.bundle import load_bundle
from opsloop.errors import ConfigError
from opsloop.monitor.app import create_monitor_app
from opsloop.monitor.service import DriftMonitor
from opsloop.monitor.settings import load_monitor_settings
from opsloop.serve.predlog import prediction_log
from tests.integration.processes import metric_value
from tests.support import log_bundle_predictions

if TYPE_CHECKING:
    from opsloop.export import ExportResult


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OPSLOOP_MONITOR_PORT", "0", "OPSLOOP_MONITOR_PORT='0' is invalid.*TCP port"),
        ("OPSLOOP_MONITOR_ALPHA", "2", "OPSLOOP_MONITOR_ALPHA='2' is invalid.*strictly between"),
        ("OPSLOOP_MONITOR_CORRECTION", "none", "unknown correction 'none'; use one of: holm"),
        ("OPSLOOP_MONITOR_INTERVAL_SECONDS", "0", "INTERVAL_SECONDS='0' is invalid"),
    ],
)
def test_bad_settings_name_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        load_monitor_settings()


def test_settings_default_to_loopback_and_read_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPSLOOP_MONITOR_WINDOW", "500")
    settings = load_monitor_settings(port=9001)
    assert settings.host == "127.0.0.1"
    assert (settings.port, settings.window, settings.interval_seconds) == (9001, 500, 60.0)


def test_failures_are_recorded_and_the_last_verdict_is_kept(
    bundle: ExportResult, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    settings = load_monitor_settings(window=50, min_samples=30, report_dir=tmp_path / "html")
    monitor = DriftMonitor(settings, bundle.path, url)
    assert monitor.check() is None
    assert monitor.last_reason == "log_unavailable"
    text = monitor.metrics.render().decode()
    assert metric_value(text, 'opsloop_drift_check_failures_total{reason="log_unavailable"}') == 1
    assert math.isnan(metric_value(text, "opsloop_drift_detected"))

    reference = load_bundle(bundle.path).load_reference()["images"]
    log_bundle_predictions(url, bundle.path, reference[:40])
    report = monitor.check()
    assert report is not None
    assert report.window_size == 40
    assert monitor.health()["healthy"] is True

    broken = DriftMonitor(settings, tmp_path / "no-bundle", url)
    assert broken.check() is None
    assert broken.last_reason == "no_reference"
    assert broken.html_report() is None

    client = TestClient(create_monitor_app(monitor))
    assert client.get("/drift").json()["window_size"] == 40
    monitor.settings = load_monitor_settings(window=50, min_samples=45)
    assert monitor.check() is None
    body = client.get("/drift").json()
    assert body["window_size"] == 40  # the last good verdict, with the monitor's health
    assert body["monitor"]["last_error_reason"] == "window_too_small"
    text = client.get("/metrics").text
    assert metric_value(text, "opsloop_drift_monitor_healthy") == 0
    assert metric_value(text, 'opsloop_drift_last_error{reason="window_too_small"}') == 1
    assert metric_value(text, 'opsloop_drift_checks_total{outcome="ok"}') == 1


def test_an_empty_log_is_a_small_window_not_a_broken_log(
    bundle: ExportResult, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    with prediction_log(url):
        pass  # the server created the table but logged nothing yet
    monitor = DriftMonitor(load_monitor_settings(), bundle.path, url)
    assert monitor.check() is None
    assert monitor.last_reason == "window_too_small"


def test_the_html_report_without_evidently_is_501_not_500(
    bundle: ExportResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    log_bundle_predictions(url, bundle.path, load_bundle(bundle.path).load_reference()["images"])
    monitor = DriftMonitor(load_monitor_settings(report_dir=tmp_path / "html"), bundle.path, url)
    assert monitor.check() is not None
    # Evidently absent, as in an install without the `monitor` extra: importing it fails.
    monkeypatch.setitem(sys.modules, "evidently", None)
    response = TestClient(create_monitor_app(monitor)).get("/drift/report")
    assert response.status_code == 501
    assert "pip install 'opsloop[monitor]'" in response.json()["error"]


def test_a_re_exported_bundle_is_picked_up(bundle: ExportResult, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    reference = load_bundle(bundle.path).load_reference()["images"]
    log_bundle_predictions(url, bundle.path, reference[:40])
    monitor = DriftMonitor(load_monitor_settings(), bundle.path, url)
    assert monitor.check() is not None
    first = monitor.reference
    assert monitor.check() is not None
    assert monitor.reference is first  # loaded once, not per check
    manifest = bundle.path / "bundle.json"
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert monitor.check() is not None
    assert monitor.reference is not first


def test_serve_refuses_a_busy_port_with_the_variable_to_fix(
    bundle: ExportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opsloop.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = ["monitor", "serve", "--port", port, "--bundle", str(bundle.path)]
        code = main([*args, "--log", f"sqlite:///{tmp_path / 'p.db'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "OPSLOOP_MONITOR_PORT" in err


def test_default_sources_follow_the_workspace_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.monitor.service import resolve_sources

    monkeypatch.setenv("OPSLOOP_WORKSPACE", str(tmp_path))
    monkeypatch.delenv("OPSLOOP_PREDLOG_URL", raising=False)
    bundle, url = resolve_sources(None, None)
    assert bundle == tmp_path / "bundles" / "digits-cnn"  # not relative to the current directory
    assert url == f"sqlite:///{tmp_path.resolve() / 'predictions.db'}"
    other = tmp_path / "other"
    bundle, _ = resolve_sources(None, None, [f"workspace={other}"])
    assert bundle == other / "bundles" / "digits-cnn"  # an explicit override wins
