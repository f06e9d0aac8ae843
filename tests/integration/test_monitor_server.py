"""`opsloop monitor --serve` as a real process on 127.0.0.1 over a real prediction log.

Clean logged predictions leave the drift flag at 0, corrupted ones turn it to 1 (on `/metrics`
and `/drift`); a window below the minimum, or a log that does not exist, is reported on
`/metrics` while the service keeps running.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from opsloop.config import DataConfig
from opsloop.corruption import corrupt
from opsloop.data import dataset_dir, load_split
from tests.integration.processes import OPSLOOP, Process, free_port, metric_value, running
from tests.support import log_bundle_predictions

if TYPE_CHECKING:
    from opsloop.export import ExportResult

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECK_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def holdout_images(trained: tuple[Path, DataConfig]) -> npt.NDArray[np.uint8]:
    """The held-out digits test split (disjoint from the bundle's reference sample)."""
    return load_split(dataset_dir(trained[1]), "test").images


@contextlib.contextmanager
def monitoring(tmp_path: Path, bundle: Path, predlog_url: str) -> Iterator[tuple[Process, str]]:
    """`opsloop monitor --serve` checking every half second; yields the process and its URL."""
    port = free_port()
    env = {
        "OPSLOOP_MONITOR_PORT": str(port),
        "OPSLOOP_MONITOR_INTERVAL_SECONDS": "0.5",
        "OPSLOOP_MONITOR_WINDOW": "100",
        "OPSLOOP_MONITOR_REPORT_DIR": str(tmp_path / "reports"),
    }
    command = [*OPSLOOP, "monitor", "serve", "--bundle", str(bundle), "--log", predlog_url]
    url = f"http://127.0.0.1:{port}"
    with running(command, tmp_path / f"monitor-{port}.log", env) as process:
        process.wait_for_http(f"{url}/health")
        yield process, url


def wait_for_metric(process: Process, url: str, sample: str, expected: float) -> str:
    """Poll `/metrics` until `sample` equals `expected`; the exposition text."""
    seen: dict[str, str] = {}

    def reached() -> bool:
        seen["text"] = httpx.get(f"{url}/metrics", timeout=5).text
        return metric_value(seen["text"], sample) == expected

    process.wait_until(reached, f"{sample} == {expected}", timeout=CHECK_TIMEOUT_S)
    return seen["text"]


def test_clean_then_corrupted_traffic_flips_the_drift_flag(
    bundle: ExportResult, holdout_images: npt.NDArray[np.uint8], tmp_path: Path
) -> None:
    predlog = f"sqlite:///{tmp_path / 'predictions.db'}"
    rng = np.random.default_rng(0)
    order = rng.permutation(len(holdout_images))
    log_bundle_predictions(predlog, bundle.path, holdout_images[order[:100]])
    with monitoring(tmp_path, bundle.path, predlog) as (monitor, url):
        text = wait_for_metric(monitor, url, "opsloop_drift_monitor_healthy", 1.0)
        assert metric_value(text, "opsloop_drift_detected") == 0.0
        assert metric_value(text, "opsloop_drift_window_size") == 100.0
        assert metric_value(text, 'opsloop_drift_detector_detected{detector="image_stats"}') == 0
        assert metric_value(text, 'opsloop_drift_checks_total{outcome="ok"}') >= 1
        assert metric_value(text, "opsloop_drift_last_check_timestamp_seconds") > time.time() - 60
        clean = httpx.get(f"{url}/drift", timeout=5).json()
        assert clean["drift"] is False
        assert clean["fired"] == []
        assert clean["window_size"] == 100
        assert clean["monitor"]["healthy"] is True

        noisy = corrupt(holdout_images[order[100:200]], "gaussian_noise", 3, pixel_max=16, rng=1)
        log_bundle_predictions(predlog, bundle.path, noisy)
        text = wait_for_metric(monitor, url, "opsloop_drift_detected", 1.0)
        assert metric_value(text, 'opsloop_drift_detector_detected{detector="image_stats"}') == 1
        assert metric_value(text, "opsloop_drift_score") > 0
        drifted = httpx.get(f"{url}/drift", timeout=5).json()
        assert drifted["drift"] is True
        assert "image_stats" in drifted["fired"]
        assert drifted["model_versions"] == {"3": 100}

        html = httpx.get(f"{url}/drift/report", timeout=120)
        assert html.status_code == 200
        assert html.headers["content-type"].startswith("text/html")
        assert "<html" in html.text[:2000].lower()
        assert "background_fraction" in html.text  # the features are in Evidently's report
        assert (tmp_path / "reports" / "drift-report.html").is_file()


def test_a_too_small_window_and_a_missing_log_are_reported_not_fatal(
    bundle: ExportResult, holdout_images: npt.NDArray[np.uint8], tmp_path: Path
) -> None:
    missing = tmp_path / "later.db"
    predlog = f"sqlite:///{missing}"
    with monitoring(tmp_path, bundle.path, predlog) as (monitor, url):
        text = wait_for_metric(
            monitor, url, 'opsloop_drift_last_error{reason="log_unavailable"}', 1.0
        )
        assert metric_value(text, "opsloop_drift_monitor_healthy") == 0
        assert np.isnan(metric_value(text, "opsloop_drift_detected"))
        assert not missing.exists()  # the monitor never creates an empty log
        pending = httpx.get(f"{url}/drift", timeout=5)
        assert pending.status_code == 503
        assert "does not exist" in pending.json()["error"]

        log_bundle_predictions(predlog, bundle.path, holdout_images[:5])
        text = wait_for_metric(
            monitor, url, 'opsloop_drift_last_error{reason="window_too_small"}', 1.0
        )
        assert metric_value(text, "opsloop_drift_window_size") == 5
        assert metric_value(text, "opsloop_drift_min_samples") == 30
        assert (
            metric_value(text, 'opsloop_drift_check_failures_total{reason="window_too_small"}') >= 1
        )
        assert metric_value(text, "opsloop_drift_monitor_healthy") == 0
        body = httpx.get(f"{url}/drift", timeout=5).json()
        assert "fewer than the minimum 30" in body["error"]
        assert body["monitor"]["last_error_reason"] == "window_too_small"
        assert httpx.get(f"{url}/drift/report", timeout=5).status_code == 503
        assert monitor.process is not None
        assert monitor.process.poll() is None  # still running after every failure
