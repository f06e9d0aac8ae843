"""`opsloop monitor check`: the JSON report, the summary, and a missing log as one error line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from opsloop.bundle import load_bundle, onnx_session
from opsloop.cli import main
from opsloop.serve.predlog import prediction_log
from tests.monitor.samples import draw, record, shifted

if TYPE_CHECKING:
    from opsloop.export import ExportResult


@pytest.fixture
def log_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'predictions.db'}"


def test_opsloop_monitor_json_and_summary(
    bundle: ExportResult,
    holdout_split: Any,
    log_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    session = onnx_session(load_bundle(bundle.path).model_path)
    noisy = shifted(draw(holdout_split[0], 100, seed=5), "gaussian_noise", 0.125)
    with prediction_log(log_url) as log:
        log.append(record(session, noisy))
    args = ["monitor", "check", "--bundle", str(bundle.path), "--log", log_url, "--last", "100"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["drift"] is True
    assert "image_stats" in data["fired"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "drift detected" in out
    assert "image_stats" in out
    assert "DRIFT" in out


def test_opsloop_monitor_reports_a_missing_log(
    bundle: ExportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    assert main(["monitor", "check", "--bundle", str(bundle.path), "--log", url, "--json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: prediction log")
    assert "does not exist" in err
