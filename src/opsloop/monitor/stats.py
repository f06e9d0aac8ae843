"""Two-sample tests per feature and their correction for multiple testing.

Kolmogorov-Smirnov per numerical feature (what Evidently's DataDriftPreset uses at these sizes),
a chi-square test on predicted-class counts, and Holm, Bonferroni or Benjamini-Hochberg adjusted
p-values over the whole family, so a window without drift is flagged with probability <= alpha.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from opsloop.errors import MonitorError
from opsloop.monitor.features import FloatArray

Correction = Literal["holm", "bonferroni", "bh"]
CORRECTIONS: tuple[str, ...] = ("holm", "bonferroni", "bh")


@dataclass
class FeatureTest:
    """One two-sample test on one feature; `p_adjusted` is set by the correction."""

    feature: str
    test: str  # "ks" (Kolmogorov-Smirnov) or "chi2" (contingency table)
    statistic: float
    p_value: float
    distance: float  # Wasserstein / reference std for "ks"; total variation for "chi2"
    p_adjusted: float = 1.0
    drifted: bool = False


def ks_tests(reference: FloatArray, current: FloatArray, names: Sequence[str]) -> list[FeatureTest]:
    """A two-sample Kolmogorov-Smirnov test per column, with a scale-free Wasserstein distance.

    KS is what Evidently's DataDriftPreset uses for numerical columns of this size (same scipy
    call, same p-values); ties on discrete features only make it conservative.
    """
    tests = []
    for column, name in enumerate(names):
        ref, cur = reference[:, column], current[:, column]
        with warnings.catch_warnings():
            # Ties make scipy's exact method fall back to the asymptotic one, with a warning
            # per call; that p-value is the one wanted.
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ks_2samp(ref, cur)
        scale = float(ref.std()) or 1.0
        tests.append(
            FeatureTest(
                feature=name,
                test="ks",
                statistic=float(result.statistic),
                p_value=float(result.pvalue),
                distance=float(stats.wasserstein_distance(ref, cur)) / scale,
            )
        )
    return tests


def class_frequency_test(
    reference: npt.NDArray[Any], current: npt.NDArray[Any], classes: int
) -> FeatureTest:
    """Chi-square test of the predicted-class counts (black-box shift detection on labels)."""
    table = np.stack(
        [np.bincount(reference, minlength=classes), np.bincount(current, minlength=classes)]
    )
    table = table[:, table.sum(axis=0) > 0]  # a class nobody predicted carries no information
    ref_share = table[0] / table[0].sum()
    cur_share = table[1] / table[1].sum()
    distance = 0.5 * float(np.abs(ref_share - cur_share).sum())
    if table.shape[1] < 2:
        return FeatureTest("predicted_class", "chi2", 0.0, 1.0, distance)
    result = stats.chi2_contingency(table, correction=False)
    return FeatureTest(
        "predicted_class", "chi2", float(result.statistic), float(result.pvalue), distance
    )


def adjust_p_values(p_values: Sequence[float], method: str) -> FloatArray:
    """Multiple-testing adjusted p-values: Holm or Bonferroni (FWER) or Benjamini-Hochberg (FDR).

    Under no drift at all, every method keeps the chance of any false flag at or below alpha
    (BH assuming positively dependent tests, as these features are).
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    order = np.argsort(p)
    ranked = p[order]
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(ranked * (m - np.arange(m)), 1.0))
    elif method == "bh":
        scaled = ranked * m / np.arange(1, m + 1)
        adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    else:
        raise MonitorError(f"unknown correction {method!r}; use one of: {', '.join(CORRECTIONS)}")
    out = np.empty(m)
    out[order] = adjusted
    return out
