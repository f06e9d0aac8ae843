"""Online quality: how right the served models were, from the labels that arrived.

`online_quality(logged)` groups a window of the prediction log by model version and role
(champion, canary, shadow) and reports, for each: accuracy on the labelled predictions with a
Wilson score interval, label coverage (labelled / served), the median label delay, and latency.
`compare(challenger, champion)` tests whether a challenger (canary or shadow) is worse or better
than the champion on the same period: a two-proportion z-test and Newcombe's interval for the
difference. Pure numpy and scipy; the window comes from `opsloop.predictions.read_predictions`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from opsloop.monitor.estimate import METHOD, AccuracyEstimator

if TYPE_CHECKING:
    from opsloop.registry.gate import LiveEvidence
from opsloop.predictions import (
    CANARY_ROLE,
    CHAMPION_ROLE,
    SHADOW_ROLE,
    LoggedPredictions,
    read_predictions,
)

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Proportion:
    """`successes` out of `trials`, with its Wilson score interval at `CONFIDENCE`."""

    successes: int
    trials: int
    lower: float
    upper: float

    @property
    def value(self) -> float:
        return self.successes / self.trials if self.trials else math.nan

    @classmethod
    def of(cls, successes: int, trials: int) -> Proportion:
        lower, upper = wilson_interval(successes, trials)
        return cls(successes, trials, lower, upper)


def wilson_interval(
    successes: int, trials: int, confidence: float = CONFIDENCE
) -> tuple[float, ...]:
    """The Wilson score interval of a proportion: sound at 0 and 1 and for small samples,
    where the textbook (Wald) interval collapses to a point or leaves [0, 1]."""
    if trials == 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class VersionQuality:
    """One model version in one role over the window."""

    model_version: str
    role: str
    predictions: int
    labelled: int
    accuracy: Proportion | None  # None without labels
    label_coverage: float  # labelled / predictions
    label_delay_seconds: float | None  # median seconds from answer to label
    latency_ms_p50: float
    latency_ms_p95: float
    first_at: float  # Unix seconds of its first and last prediction in the window
    last_at: float

    @property
    def key(self) -> tuple[str, str]:
        return self.model_version, self.role


def online_quality(logged: LoggedPredictions) -> list[VersionQuality]:
    """Quality per (model version, role) in the window, champion rows first, then by version."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, key in enumerate(zip(logged.model_versions, logged.roles, strict=True)):
        groups.setdefault(key, []).append(index)
    results = [
        _quality(logged, version, role, np.array(rows)) for (version, role), rows in groups.items()
    ]
    return sorted(results, key=lambda q: (q.role != CHAMPION_ROLE, q.role, q.model_version))


def _quality(
    logged: LoggedPredictions, version: str, role: str, rows: np.ndarray
) -> VersionQuality:
    labelled = rows[logged.true_labels[rows] >= 0]
    correct = int((logged.labels[labelled] == logged.true_labels[labelled]).sum())
    delays = logged.labelled_at[labelled] - logged.created_at[labelled]
    latency = logged.latency_ms[rows]
    return VersionQuality(
        model_version=version,
        role=role,
        predictions=len(rows),
        labelled=len(labelled),
        accuracy=Proportion.of(correct, len(labelled)) if len(labelled) else None,
        label_coverage=len(labelled) / len(rows),
        # A label may arrive before its prediction was logged: that delay counts as zero.
        label_delay_seconds=float(np.median(np.maximum(delays, 0.0))) if len(labelled) else None,
        latency_ms_p50=float(np.percentile(latency, 50)),
        latency_ms_p95=float(np.percentile(latency, 95)),
        first_at=float(logged.created_at[rows].min()),
        last_at=float(logged.created_at[rows].max()),
    )


@dataclass(frozen=True)
class Comparison:
    """A challenger's accuracy minus the champion's, with its interval and a two-sided p-value."""

    champion_version: str
    challenger_version: str
    challenger_role: str
    difference: float
    lower: float
    upper: float
    p_value: float
    champion: Proportion
    challenger: Proportion

    def confidently_worse(self, margin: float) -> bool:
        """Worse than the champion by more than `margin`, with confidence: the whole interval
        of the difference lies below -margin (so noise alone does not trigger it)."""
        return self.upper < -margin


def compare(challenger: Proportion, champion: Proportion) -> tuple[float, float, float, float]:
    """(difference, lower, upper, two-sided p) of challenger minus champion accuracy.

    The interval is Newcombe's hybrid score interval (from the two Wilson intervals), which keeps
    its coverage at small counts and near 0 or 1; the p-value is the pooled two-proportion z-test.
    """
    p1, p2 = challenger.value, champion.value
    difference = p1 - p2
    lower = difference - math.sqrt((p1 - challenger.lower) ** 2 + (champion.upper - p2) ** 2)
    upper = difference + math.sqrt((challenger.upper - p1) ** 2 + (p2 - champion.lower) ** 2)
    pooled = (challenger.successes + champion.successes) / (challenger.trials + champion.trials)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / challenger.trials + 1 / champion.trials))
    p_value = 1.0 if spread == 0 else float(2 * stats.norm.sf(abs(difference) / spread))
    return difference, max(-1.0, lower), min(1.0, upper), p_value


def compare_challengers(quality: list[VersionQuality]) -> list[Comparison]:
    """Every labelled canary or shadow version against the labelled champion of the window."""
    champions = [q for q in quality if q.role == CHAMPION_ROLE and q.accuracy is not None]
    if not champions:
        return []
    champion = max(champions, key=lambda q: q.labelled)  # the one that served the period
    assert champion.accuracy is not None
    comparisons = []
    for other in quality:
        if other.role == CHAMPION_ROLE or other.accuracy is None:
            continue
        difference, lower, upper, p_value = compare(other.accuracy, champion.accuracy)
        comparisons.append(
            Comparison(
                champion_version=champion.model_version,
                challenger_version=other.model_version,
                challenger_role=other.role,
                difference=difference,
                lower=lower,
                upper=upper,
                p_value=p_value,
                champion=champion.accuracy,
                challenger=other.accuracy,
            )
        )
    return comparisons


@dataclass(frozen=True)
class Estimate:
    """A label-free accuracy estimate of one version's recent answers (`monitor.estimate`)."""

    model_version: str
    value: float
    window_size: int
    method: str


@dataclass(frozen=True)
class QualityReport:
    """Online accuracy per version and role, challengers against the champion, and estimates."""

    window_size: int
    versions: list[VersionQuality]
    comparisons: list[Comparison]
    estimates: list[Estimate]
    checked_at: float
    # The served predictions the window stands for: more than `window_size` when the server
    # logs only a sample of its requests (each row counts 1/sample_rate).
    window_served: float = 0.0

    def version(self, model_version: str, role: str = CHAMPION_ROLE) -> VersionQuality | None:
        """The quality of one version in one role, if the window holds it."""
        return next((q for q in self.versions if q.key == (model_version, role)), None)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready values; NaN and infinity become None."""
        from opsloop.monitor.report import finite

        document: dict[str, object] = finite(dataclasses.asdict(self))
        return document


def assess_quality(
    logged: LoggedPredictions,
    *,
    estimator: AccuracyEstimator | None = None,
    estimator_version: str | None = None,
    min_samples: int = 30,
) -> QualityReport:
    """Quality of a window of the log: labels where they arrived, the estimate where they did not.

    The estimate covers the version the estimator was exported with (its champion answers in
    the window, at least `min_samples` of them).
    """
    versions = online_quality(logged)
    estimates = []
    if estimator is not None and estimator_version is not None:
        rows = np.array(
            [
                version == estimator_version and role == CHAMPION_ROLE
                for version, role in zip(logged.model_versions, logged.roles, strict=True)
            ],
            dtype=bool,
        )
        # The estimator reads embeddings as the log keeps them for its own bundle: rows of
        # another width (NaN when read back) come from another model.
        widths = {estimator.embedding_width}
        if estimator.basis is not None:
            widths.add(len(estimator.basis.mean))
        if logged.embeddings.ndim == 2 and logged.embeddings.shape[1] in widths:
            rows &= np.isfinite(logged.embeddings).all(axis=1)
        else:
            rows[:] = False
        shapes = {logged.inputs[i].shape for i in np.flatnonzero(rows)}
        if rows.sum() >= min_samples and len(shapes) == 1:
            own = logged.where(rows)
            value = estimator.estimate(np.stack(own.inputs), own.probabilities, own.embeddings)
            estimates.append(Estimate(estimator_version, value, len(own), METHOD))
    return QualityReport(
        window_size=len(logged),
        versions=versions,
        comparisons=compare_challengers(versions),
        estimates=estimates,
        checked_at=time.time(),
        window_served=logged.served,
    )


def live_evidence(
    url: str, challenger_version: str, champion_version: str, *, last: int = 5000
) -> LiveEvidence | None:
    """The challenger's labelled shadow or canary answers against the champion's, from the last
    `last` answers of the log; None when the challenger answered none there (what the promotion
    gate reads with `registry.live_min_labels`)."""
    from opsloop.registry.gate import LiveEvidence

    quality = {q.key: q for q in online_quality(read_predictions(url, limit=last))}
    champion = quality.get((champion_version, CHAMPION_ROLE))
    live = [
        q
        for role in (CANARY_ROLE, SHADOW_ROLE)
        if (q := quality.get((challenger_version, role))) is not None and q.accuracy is not None
    ]
    if not live or champion is None or champion.accuracy is None:
        return None
    best = max(live, key=lambda q: q.labelled)
    assert best.accuracy is not None
    difference, lower, upper, _ = compare(best.accuracy, champion.accuracy)
    return LiveEvidence(
        role=best.role,
        challenger_labelled=best.labelled,
        champion_labelled=champion.labelled,
        challenger_accuracy=best.accuracy.value,
        champion_accuracy=champion.accuracy.value,
        difference=difference,
        lower=lower,
        upper=upper,
    )
