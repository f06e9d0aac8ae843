"""Drift detection: clean vs shifted windows, bad input, the prediction log, reports and the CLI."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.bundle import BUNDLE_JSON, REFERENCE_FILE, load_bundle, onnx_session, run_onnx
from opsloop.cli import main
from opsloop.config import DataConfig
from opsloop.corruption import CORRUPTIONS, to_dtype
from opsloop.data import dataset_dir, load_split
from opsloop.errors import BundleError, MonitorError
from opsloop.monitor import (
    IMAGE_FEATURES,
    ReferenceData,
    Window,
    adjust_p_values,
    detect_drift,
    image_statistics,
    load_reference,
    window_from_images,
    window_from_log,
    write_html_report,
)
from opsloop.serve.predlog import LogRecord, prediction_log

if TYPE_CHECKING:
    from opsloop.export import ExportResult

Images = npt.NDArray[np.uint8]


@pytest.fixture(scope="module")
def reference(bundle: ExportResult) -> ReferenceData:
    return load_reference(bundle.path)


@pytest.fixture(scope="module")
def holdout_split(trained: tuple[Path, DataConfig]) -> tuple[Images, npt.NDArray[np.int64]]:
    """The held-out digits test split: disjoint from the reference (the val split)."""
    split = load_split(dataset_dir(trained[1]), "test")
    return split.images, split.labels


def draw(images: Images, n: int, seed: int) -> Images:
    """A window drawn without replacement."""
    return images[np.random.default_rng(seed).choice(len(images), size=n, replace=False)]


def shifted(images: Images, name: str, level: float, seed: int = 0) -> Images:
    corruption = CORRUPTIONS[name]
    changed = corruption.transform(
        images.astype(np.float64), level, 16.0, np.random.default_rng(seed)
    )
    return np.asarray(to_dtype(np.clip(changed, 0, 16), images.dtype), dtype=np.uint8)


def window(bundle: ExportResult, images: Images) -> Window:
    return window_from_images(images, load_bundle(bundle.path))


def test_reference_features_are_computed_once(reference: ReferenceData) -> None:
    assert reference.image_stats.shape == (len(reference), len(IMAGE_FEATURES))
    assert np.isfinite(reference.image_stats).all()
    assert 1 <= reference.projected.shape[1] <= 8
    assert reference.model_version == "3"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_windows_are_not_flagged(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any, seed: int
) -> None:
    report = detect_drift(reference, window(bundle, draw(holdout_split[0], 100, seed)))
    assert report.drift is False, report.fired
    assert report.window_size == 100
    assert report.p_value >= 0.05
    assert {d.name for d in report.detectors} == {"image_stats", "embedding", "softmax"}


@pytest.mark.parametrize(
    ("name", "level", "detector"),
    [
        ("gaussian_noise", 2 / 16, "image_stats"),  # sigma 2 on the 0-16 scale
        ("rotation", 20.0, "image_stats"),
        ("contrast", 0.5, "image_stats"),
    ],
)
def test_strong_shifts_are_flagged(
    bundle: ExportResult,
    reference: ReferenceData,
    holdout_split: Any,
    name: str,
    level: float,
    detector: str,
) -> None:
    images = shifted(draw(holdout_split[0], 100, seed=7), name, level)
    report = detect_drift(reference, window(bundle, images))
    assert report.drift is True
    assert detector in report.fired
    assert report.detector(detector).p_value < 0.05
    assert report.score > 0


def test_label_prior_shift_is_flagged_by_the_softmax_detector(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any
) -> None:
    images, labels = holdout_split
    report = detect_drift(reference, window(bundle, draw(images[labels < 5], 100, seed=3)))
    assert report.drift is True
    assert "softmax" in report.fired
    chi2 = next(t for t in report.detector("softmax").features if t.feature == "predicted_class")
    assert chi2.test == "chi2"
    assert chi2.drifted
    assert chi2.distance > 0.3


def test_an_empty_window_is_a_clear_error(reference: ReferenceData) -> None:
    empty = Window(
        np.zeros((0, 1, 8, 8), np.uint8), np.zeros((0, 10), np.float32), np.zeros((0, 32))
    )
    with pytest.raises(MonitorError, match="the window is empty"):
        detect_drift(reference, empty)


def test_a_too_small_window_is_a_clear_error(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any
) -> None:
    small = window(bundle, draw(holdout_split[0], 10, seed=0))
    with pytest.raises(MonitorError, match="has 10 predictions, fewer than the minimum 30"):
        detect_drift(reference, small)
    assert detect_drift(reference, small, min_samples=10).window_size == 10


def test_a_window_of_another_model_is_refused(reference: ReferenceData) -> None:
    other = Window(
        np.zeros((40, 1, 28, 28), np.uint8), np.zeros((40, 10), np.float32), np.zeros((40, 32))
    )
    with pytest.raises(MonitorError, match="belongs to another model"):
        detect_drift(reference, other)


def test_bad_alpha_and_correction_are_refused(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any
) -> None:
    clean = window(bundle, draw(holdout_split[0], 50, seed=0))
    with pytest.raises(MonitorError, match=r"alpha=1\.5"):
        detect_drift(reference, clean, alpha=1.5)
    with pytest.raises(MonitorError, match="unknown correction 'fdr'"):
        detect_drift(reference, clean, correction="fdr")


def test_mixed_model_versions_are_reported(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any
) -> None:
    clean = window(bundle, draw(holdout_split[0], 60, seed=0))
    mixed = Window(
        clean.images, clean.probabilities, clean.embeddings, model_versions=["3"] * 40 + ["4"] * 20
    )
    report = detect_drift(reference, mixed)
    assert report.mixed_versions is True
    assert report.model_versions == {"3": 40, "4": 20}
    assert any("mixes model versions 3 (40), 4 (20)" in w for w in report.warnings)
    assert any("version(s) 4 but the reference is version 3" in w for w in report.warnings)


def test_the_json_report_has_a_top_level_boolean_drift(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any
) -> None:
    report = detect_drift(reference, window(bundle, draw(holdout_split[0], 50, seed=1)))
    data = json.loads(report.to_json())
    assert isinstance(data["drift"], bool)
    assert data["drift"] is report.drift
    assert data["window_size"] == 50
    assert data["alpha"] == 0.05
    assert data["correction"] == "holm"
    features = data["detectors"][0]["features"]
    assert {"feature", "p_value", "p_adjusted", "distance", "drifted"} <= set(features[0])


def test_the_html_report_is_written_and_matches_evidentlys_p_values(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any, tmp_path: Path
) -> None:
    from evidently import Report
    from evidently.presets import DataDriftPreset

    current = window(bundle, shifted(draw(holdout_split[0], 80, seed=2), "gaussian_noise", 0.125))
    report = detect_drift(reference, current)
    path = write_html_report(reference, current, tmp_path / "out" / "drift.html", report=report)
    assert path.is_file()
    assert "<html" in path.read_text(encoding="utf-8")[:2000].lower()
    # Our image-statistics p-values are the ones Evidently computes for the same columns.
    import pandas as pd

    columns = list(IMAGE_FEATURES)
    snapshot = Report([DataDriftPreset(num_method="ks")]).run(
        reference_data=pd.DataFrame(reference.image_stats, columns=columns),
        current_data=pd.DataFrame(image_statistics(current.images, 16.0), columns=columns),
    )
    evidently = {
        m["config"]["column"]: m["value"]
        for m in snapshot.dict()["metrics"]
        if m["config"].get("type", "").endswith("ValueDrift")
    }
    ours = {t.feature: t.p_value for t in report.detector("image_stats").features}
    assert evidently.keys() == ours.keys()
    for feature, p_value in ours.items():
        assert evidently[feature] == pytest.approx(p_value, rel=1e-6, abs=1e-12), feature


def test_adjusted_p_values() -> None:
    p = [0.01, 0.04, 0.03]
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.03, 0.12, 0.09])
    assert adjust_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06])
    assert adjust_p_values(p, "bh") == pytest.approx([0.03, 0.04, 0.04])


def test_image_statistics_see_blur_and_noise(holdout_split: Any) -> None:
    images = draw(holdout_split[0], 100, seed=0)
    base = image_statistics(images, 16.0).mean(axis=0)
    blurred = image_statistics(shifted(images, "gaussian_blur", 1 / 8), 16.0).mean(axis=0)
    noisy = image_statistics(shifted(images, "gaussian_noise", 2 / 16), 16.0).mean(axis=0)
    sharpness, background = (
        IMAGE_FEATURES.index("sharpness"),
        IMAGE_FEATURES.index("background_fraction"),
    )
    assert blurred[sharpness] < 0.8 * base[sharpness]
    assert noisy[background] < 0.8 * base[background]


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


# --- the prediction log ----------------------------------------------------------------------


def record(
    session: Any, images: Images, *, version: str = "3", at: float | None = None
) -> LogRecord:
    outputs = run_onnx(session, images)
    return LogRecord(
        request_id=f"r{time.monotonic_ns()}",
        created_at=time.time() if at is None else at,
        endpoint="infer",
        model_name="digits",
        model_version=version,
        inputs=images.astype(np.float32),
        probabilities=outputs["probabilities"],
        embedding=outputs["embedding"],
        latency_ms=1.0,
    )


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
    with pytest.raises(MonitorError, match=r"nowhere\.db does not exist; start `opsloop serve`"):
        window_from_log(f"sqlite:///{missing}", last=10)
    assert not missing.exists()  # reading never creates an empty log
    with pytest.raises(MonitorError, match="is invalid"):
        window_from_log("not a url", last=10)
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(MonitorError, match="cannot read the prediction log"):
        window_from_log(f"sqlite:///{other}", last=10)


def test_an_empty_log_is_a_clear_error(log_url: str) -> None:
    with prediction_log(log_url):
        pass
    with pytest.raises(MonitorError, match="has no predictions; send traffic"):
        window_from_log(log_url, last=10)


# --- the CLI ---------------------------------------------------------------------------------


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
    args = ["monitor", "--bundle", str(bundle.path), "--log", log_url, "--last", "100"]
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
    assert main(["monitor", "--bundle", str(bundle.path), "--log", url, "--json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: prediction log")
    assert "does not exist" in err
