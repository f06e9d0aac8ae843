"""Drift detection on windows of real model outputs: clean ones pass, shifted ones are flagged."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from opsloop.errors import MonitorError
from opsloop.monitor import (
    ReferenceData,
    Window,
    detect_drift,
)
from tests.monitor.samples import draw, shifted, window

if TYPE_CHECKING:
    from opsloop.export import ExportResult


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
