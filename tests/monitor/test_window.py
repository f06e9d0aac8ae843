"""The reference sample of a bundle and windows read from the prediction log."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from opsloop.bundle import BUNDLE_JSON, REFERENCE_FILE, load_bundle, onnx_session
from opsloop.errors import BundleError, EmptyWindowError, PredictionLogError
from opsloop.monitor import (
    ReferenceData,
    detect_drift,
    load_reference,
    window_from_log,
)
from opsloop.monitor.features import IMAGE_FEATURES
from opsloop.serve.predlog import prediction_log
from tests.monitor.samples import draw, record

if TYPE_CHECKING:
    from opsloop.export import ExportResult


def test_reference_features_are_computed_once(reference: ReferenceData) -> None:
    assert reference.image_stats.shape == (len(reference), len(IMAGE_FEATURES))
    assert np.isfinite(reference.image_stats).all()
    assert 1 <= reference.projected.shape[1] <= 8
    assert reference.model_version == "3"


def test_a_bundle_without_reference_data_is_a_clear_error(
    bundle: ExportResult, tmp_path: Path
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    manifest = json.loads((copy / BUNDLE_JSON).read_text())
    del manifest["files"][REFERENCE_FILE]
    (copy / BUNDLE_JSON).write_text(json.dumps(manifest))
    (copy / REFERENCE_FILE).unlink()
    with pytest.raises(BundleError, match="has no reference data; re-export it"):
        load_reference(copy)


@pytest.fixture
def log_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'predictions.db'}"


def test_a_window_is_read_from_the_prediction_log(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any, log_url: str
) -> None:
    session = onnx_session(load_bundle(bundle.path).model_path)
    images = draw(holdout_split[0], 120, seed=4)
    now = time.time()
    with prediction_log(log_url, flush_interval_s=0.01) as log:
        log.append(record(session, images[:40], at=now - 3600))
        log.append(record(session, images[40:], at=now))
    latest = window_from_log(log_url, last=100)
    assert len(latest) == 100
    assert latest.images.shape == (100, 1, 8, 8)
    np.testing.assert_array_equal(latest.images, images[20:].astype(np.float32))
    assert window_from_log(log_url, since=now - 60).images.shape[0] == 80
    report = detect_drift(reference, latest)
    assert report.drift is False
    assert report.model_versions == {"3": 100}
    assert report.time_range[0] is not None
    assert report.time_range[0] <= report.time_range[1]


def test_a_window_is_read_while_the_server_appends(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any, log_url: str
) -> None:
    session = onnx_session(load_bundle(bundle.path).model_path)
    images = holdout_split[0]
    stop = threading.Event()
    sizes: list[int] = []
    with prediction_log(log_url, flush_interval_s=0.005) as log:
        log.append(record(session, images[:50]))
        while log.rows_written < 50:
            time.sleep(0.01)

        def write() -> None:
            start = 0
            while not stop.is_set():
                log.append(record(session, draw(images, 10, seed=start)))
                start += 1
                time.sleep(0.002)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for _ in range(10):  # reads under WAL never wait for, nor block, the writer
                current = window_from_log(log_url, last=200)
                sizes.append(len(current))
                assert len(current.probabilities) == len(current.images) == len(current)
                detect_drift(reference, current)
        finally:
            stop.set()
            writer.join()
    assert sizes == sorted(sizes)
    assert sizes[-1] > 50
    journal = sqlite3.connect(log_url.removeprefix("sqlite:///"))
    assert journal.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    journal.close()


def test_log_problems_are_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    with pytest.raises(
        PredictionLogError, match=r"nowhere\.db does not exist; start `opsloop serve`"
    ):
        window_from_log(f"sqlite:///{missing}", last=10)
    assert not missing.exists()  # reading never creates an empty log
    with pytest.raises(PredictionLogError, match="is invalid"):
        window_from_log("not a url", last=10)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute(
        "CREATE TABLE prediction_requests (x INTEGER)"
    ).connection.close()
    with pytest.raises(PredictionLogError, match="cannot read the prediction log"):
        window_from_log(f"sqlite:///{other}", last=10)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # no tables yet: nothing was logged
    with pytest.raises(EmptyWindowError, match="has no predictions"):
        window_from_log(f"sqlite:///{empty}", last=10)


def test_an_empty_log_is_a_clear_error(log_url: str) -> None:
    with prediction_log(log_url):
        pass
    with pytest.raises(EmptyWindowError, match="has no predictions; send traffic"):
        window_from_log(log_url, last=10)


def test_a_confident_models_clean_answers_are_not_drift_after_the_log(log_url: str) -> None:
    """The log keeps probabilities exactly: a model whose answers crowd just below 1 (where half
    precision rounds them all to 1) is compared with its reference like with like."""
    from opsloop.monitor.report import detect_drift
    from opsloop.serve.journal import LogRecord

    rng = np.random.default_rng(0)

    def answers(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = rng.integers(0, 17, (n, 1, 8, 8)).astype(np.float32)
        logits = rng.normal(size=(n, 10)) + 12.0 * np.eye(10)[rng.integers(0, 10, n)]
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return images, probabilities.astype(np.float32), rng.normal(size=(n, 32)).astype(np.float32)

    reference = ReferenceData.from_arrays(*answers(400), pixel_max=16.0)
    assert np.median(reference.probabilities.max(axis=1)) > 0.9999  # rounds to 1 in float16
    images, probabilities, embeddings = answers(200)
    with prediction_log(log_url, flush_interval_s=0.01) as log:
        for row in range(200):
            log.append(
                LogRecord(
                    request_id=f"r{row}",
                    created_at=time.time(),
                    endpoint="infer",
                    model_name="digits",
                    model_version="1",
                    inputs=images[row : row + 1],
                    probabilities=probabilities[row : row + 1],
                    embedding=embeddings[row : row + 1],
                    latency_ms=1.0,
                )
            )
    report = detect_drift(reference, window_from_log(log_url, last=200))
    assert "softmax" not in report.fired
