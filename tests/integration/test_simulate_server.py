"""`opsloop simulate` against a real `opsloop serve` on 127.0.0.1, then drift over the log.

The issue's "done when": the simulator's clean traffic is not flagged, its corrupted traffic is,
and the report says which detector fired.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from opsloop.cli import main
from opsloop.config import DataConfig
from opsloop.data import dataset_dir
from opsloop.monitor import detect_drift, load_reference, window_from_log
from opsloop.predictions import read_predictions
from tests.integration.processes import serving_bundle

if TYPE_CHECKING:
    from opsloop.export import ExportResult

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for_rows(url: str, rows: int, timeout: float = 30.0) -> None:
    """The server writes its log every 50 ms; wait until `rows` rows are there."""
    deadline = time.monotonic() + timeout
    while len(read_predictions(url)) < rows:
        assert time.monotonic() < deadline, f"the prediction log never reached {rows} rows"
        time.sleep(0.1)


def test_clean_traffic_is_not_flagged_and_corrupted_traffic_is(
    bundle: ExportResult,
    trained: tuple[Path, DataConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    predlog = f"sqlite:///{tmp_path / 'predictions.db'}"
    reference = load_reference(bundle.path)
    common = ["--bundle", str(bundle.path), "--data", str(dataset_dir(trained[1]))]
    with serving_bundle(bundle.path, tmp_path, predlog) as url:
        args = ["simulate", "--url", url, *common, "--rate", "200", "--batch", "2"]
        assert main([*args, "--clean", "50", "--corrupted", "0"]) == 0
        out = capsys.readouterr().out
        assert "clean" in out
        assert "50 requests (100 images), 50 ok, 0 failed" in out
        wait_for_rows(predlog, 100)
        clean = detect_drift(reference, window_from_log(predlog, last=100))
        assert clean.drift is False
        assert clean.model_versions == {"3": 100}

        assert main([*args, "--clean", "0", "--corrupted", "50", "--severity", "3"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"corrupted +50 requests \(100 images\), 50 ok, 0 failed", out)
        assert "gaussian_noise severity 3" in out
        wait_for_rows(predlog, 200)
        shifted = detect_drift(reference, window_from_log(predlog, last=100))
        assert shifted.drift is True
        assert "image_stats" in shifted.fired

        # Bounded in time: at 5 requests/s, a 1 s limit stops a run of 100 requests early.
        started = time.monotonic()
        assert main([*args[:-4], "--rate", "5", "--clean", "100", "--corrupted", "0",
                     "--max-seconds", "1"]) == 0  # fmt: skip
        assert time.monotonic() - started < 30
        assert "stopped at --max-seconds" in capsys.readouterr().out


def test_a_remote_target_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--url", "http://192.0.2.1:8000", "--clean", "1"]) == 2
    assert "not on this machine" in capsys.readouterr().err
