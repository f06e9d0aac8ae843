"""Drift detection: every detector's tests on one window, corrected together, as a `DriftReport`.

`detect_drift(load_reference(bundle), window_from_log(url, last=200))` runs three detectors —
image statistics of the raw inputs, a PCA projection of the embeddings, and the softmax outputs
(black-box shift detection) — as per-feature two-sample tests, corrects them together for
multiple testing and returns a report whose top-level `drift` is the verdict. Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from opsloop.errors import MonitorError
from opsloop.monitor.features import IMAGE_FEATURES, image_statistics, softmax_features
from opsloop.monitor.stats import (
    CORRECTIONS,
    FeatureTest,
    adjust_p_values,
    class_frequency_test,
    ks_tests,
)
from opsloop.monitor.window import ReferenceData, Window, iso_time

logger = logging.getLogger(__name__)

DEFAULT_MIN_SAMPLES = 30
# The detectors, by the name reports, metrics and the benchmark use.
DETECTORS = ("image_stats", "embedding", "softmax")


@dataclass
class DetectorResult:
    """A detector's tests and its verdict (any feature drifted after the global correction)."""

    name: str
    description: str
    features: list[FeatureTest]
    drift: bool = False
    p_value: float = 1.0  # the smallest corrected p-value among its features
    score: float = 0.0  # the share of its features that drifted
    distance: float = 0.0  # the largest feature distance

    def describe(self) -> str:
        """One line: the verdict, the smallest corrected p-value and the drifted features."""
        drifted = [test.feature for test in self.features if test.drifted]
        verdict = "DRIFT" if self.drift else "ok"
        more = ", ..." if len(drifted) > 4 else ""
        listed = f": {', '.join(drifted[:4])}{more}" if drifted else ""
        return (
            f"{verdict} (min corrected p {self.p_value:.2g}, "
            f"{len(drifted)}/{len(self.features)} features drifted{listed})"
        )

    def summarise(self) -> None:
        self.drift = any(test.drifted for test in self.features)
        self.p_value = min((test.p_adjusted for test in self.features), default=1.0)
        drifted = sum(test.drifted for test in self.features)
        self.score = drifted / len(self.features) if self.features else 0.0
        self.distance = max((test.distance for test in self.features), default=0.0)


@dataclass
class DriftReport:
    """The verdict on one window: drifted or not, why, and what the window held."""

    drift: bool
    score: float  # the largest share of drifted features of any detector, 0..1
    p_value: float  # the smallest corrected p-value of all tests
    alpha: float
    correction: str
    window_size: int
    reference_size: int
    time_range: tuple[str | None, str | None]
    model_versions: dict[str, int]
    reference_model_version: str | None
    mixed_versions: bool
    detectors: list[DetectorResult]
    warnings: list[str] = field(default_factory=list)
    source: str = "arrays"
    checked_at: str = ""
    seconds: float = 0.0

    @property
    def fired(self) -> list[str]:
        """The names of the detectors that flagged drift."""
        return [detector.name for detector in self.detectors if detector.drift]

    def detector(self, name: str) -> DetectorResult:
        """The result of the detector called `name`."""
        for result in self.detectors:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (NaN and infinity become None)."""
        result: dict[str, Any] = finite(dataclasses.asdict(self) | {"fired": self.fired})
        return result

    def to_json(self, *, indent: bool = True) -> str:
        """The report as JSON with a top-level boolean `drift` (for scripts and alerting)."""
        option = orjson.OPT_INDENT_2 if indent else 0
        return orjson.dumps(self.to_dict(), option=option).decode()


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: map them to None so every consumer can parse the report."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def detect_drift(
    reference: ReferenceData,
    current: Window,
    *,
    alpha: float = 0.05,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    correction: str = "holm",
) -> DriftReport:
    """Test `current` against `reference` with every detector; drift if any corrected test fires.

    All per-feature tests of all detectors form one family for the correction, so the chance
    that a window without drift is flagged at all stays at or below `alpha`.
    """
    started = time.perf_counter()
    _check_arguments(reference, current, alpha, min_samples, correction)
    detectors = run_detectors(reference, current)
    tests = [test for detector in detectors for test in detector.features]
    for test, adjusted in zip(
        tests, adjust_p_values([t.p_value for t in tests], correction), strict=True
    ):
        test.p_adjusted = float(adjusted)
        test.drifted = bool(adjusted < alpha)
    for detector in detectors:
        detector.summarise()
    versions, warnings = _version_summary(reference, current)
    report = DriftReport(
        drift=any(detector.drift for detector in detectors),
        score=max(detector.score for detector in detectors),
        p_value=min(detector.p_value for detector in detectors),
        alpha=alpha,
        correction=correction,
        window_size=len(current),
        reference_size=len(reference),
        time_range=_time_range(current.created_at),
        model_versions=versions,
        reference_model_version=reference.model_version,
        mixed_versions=len(versions) > 1,
        detectors=detectors,
        warnings=warnings,
        source=current.source,
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
    )
    for warning in warnings:
        logger.warning("%s", warning)
    return report


def run_detectors(reference: ReferenceData, current: Window) -> list[DetectorResult]:
    """The uncorrected tests of the three detectors on one window."""
    softmax, names = softmax_features(current.probabilities)
    classes = reference.probabilities.shape[1]
    return [
        DetectorResult(
            "image_stats",
            "input drift: KS per image statistic of the raw pixels",
            ks_tests(
                reference.image_stats,
                image_statistics(current.images, reference.pixel_max),
                IMAGE_FEATURES,
            ),
        ),
        DetectorResult(
            "embedding",
            "model-based drift: KS per principal component of the embedding (PCA on reference)",
            ks_tests(
                reference.projected,
                reference.projection.transform(current.embeddings),
                reference.projection.names,
            ),
        ),
        DetectorResult(
            "softmax",
            "black-box shift detection: chi-square on predicted classes, KS per class "
            "probability, confidence and entropy",
            [
                class_frequency_test(
                    reference.probabilities.argmax(axis=1),
                    current.probabilities.argmax(axis=1),
                    classes,
                ),
                *ks_tests(reference.softmax, softmax, names),
            ],
        ),
    ]


def _check_arguments(
    reference: ReferenceData, current: Window, alpha: float, min_samples: int, correction: str
) -> None:
    if not 0.0 < alpha < 1.0:
        raise MonitorError(f"alpha={alpha} must lie strictly between 0 and 1 (e.g. 0.05)")
    if correction not in CORRECTIONS:
        raise MonitorError(
            f"unknown correction {correction!r}; use one of: {', '.join(CORRECTIONS)}"
        )
    if len(current) == 0:
        raise MonitorError(
            "the window is empty: there is nothing to compare; widen it (--last/--since)"
        )
    if len(current) < min_samples:
        raise MonitorError(
            f"the window has {len(current)} predictions, fewer than the minimum {min_samples}; "
            "widen it (--last/--since) or lower --min-samples"
        )
    _check_shapes(reference, current)


def _check_shapes(reference: ReferenceData, current: Window) -> None:
    if current.images.shape[1:] != reference.images.shape[1:]:
        raise MonitorError(
            f"window images are shaped {current.images.shape[1:]} but the reference's are "
            f"{reference.images.shape[1:]}: the window belongs to another model"
        )
    probabilities, embeddings = current.probabilities, current.embeddings
    expected = reference.probabilities.shape[1]
    if probabilities.ndim != 2 or len(probabilities) != len(current):
        raise MonitorError(f"window probabilities are shaped {probabilities.shape}: not a matrix")
    if probabilities.shape[1] != expected:
        raise MonitorError(
            f"window probabilities are shaped {probabilities.shape}, expected ({len(current)}, "
            f"{expected}): the window belongs to another model"
        )
    # Whole embeddings, or their coordinates on the bundle's log basis as the log keeps them.
    if (
        embeddings.ndim != 2
        or len(embeddings) != len(current)
        or not reference.projection.accepts(embeddings.shape[1])
    ):
        widths = sorted({len(reference.projection.mean), reference.projection.logged_width} - {0})
        raise MonitorError(
            f"window embeddings are shaped {embeddings.shape}, expected ({len(current)}, "
            f"{' or '.join(map(str, widths))}): the window belongs to another model"
        )


def _version_summary(reference: ReferenceData, current: Window) -> tuple[dict[str, int], list[str]]:
    """Model versions seen in the window, and warnings when they cannot be compared cleanly."""
    versions = dict(Counter(current.model_versions))
    warnings = []
    if len(versions) > 1:
        listed = ", ".join(f"{v} ({n})" for v, n in sorted(versions.items()))
        warnings.append(
            f"the window mixes model versions {listed}: model-based detectors compare a blend; "
            "narrow the window to after the last model swap"
        )
    foreign = sorted(set(versions) - {reference.model_version})
    if reference.model_version is not None and foreign:
        warnings.append(
            f"the window holds predictions of model version(s) {', '.join(foreign)} but the "
            f"reference is version {reference.model_version}: embedding and softmax drift may "
            "reflect the model change; monitor with the served version's bundle"
        )
    return versions, warnings


def _time_range(created_at: npt.NDArray[np.float64] | None) -> tuple[str | None, str | None]:
    if created_at is None or len(created_at) == 0:
        return None, None
    return iso_time(float(created_at.min())), iso_time(float(created_at.max()))
