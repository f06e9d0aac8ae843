"""Online quality: Wilson intervals, per-version accuracy from joined labels, challenger tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opsloop.monitor.quality import (
    Proportion,
    assess_quality,
    compare,
    compare_challengers,
    online_quality,
    wilson_interval,
)
from opsloop.predictions import NO_LABEL, LoggedPredictions


def logged(
    versions: list[str], roles: list[str], predicted: list[int], truth: list[int]
) -> LoggedPredictions:
    n = len(versions)
    created = np.arange(n, dtype=np.float64) + 1000.0
    labelled_at = np.where(np.array(truth) == NO_LABEL, np.nan, created + 2.0)
    return LoggedPredictions(
        request_ids=[f"r{i}" for i in range(n)],
        items=np.zeros(n, np.int64),
        created_at=created,
        model_names=["digits"] * n,
        model_versions=versions,
        roles=roles,
        endpoints=["infer"] * n,
        inputs=[np.zeros((1, 8, 8), np.float32)] * n,
        probabilities=np.eye(10, dtype=np.float32)[predicted],
        embeddings=np.zeros((n, 4), np.float32),
        labels=np.array(predicted, np.int64),
        latency_ms=np.linspace(1.0, 3.0, n),
        true_labels=np.array(truth, np.int64),
        labelled_at=labelled_at,
    )


def test_wilson_matches_the_textbook_values() -> None:
    # Wilson (1927) / Newcombe (1998) table: 81 of 263 -> 0.2553..0.3662.
    lower, upper = wilson_interval(81, 263)
    assert lower == pytest.approx(0.2553, abs=5e-4)
    assert upper == pytest.approx(0.3662, abs=5e-4)
    lower, upper = wilson_interval(0, 10)  # never collapses to a point at 0
    assert lower == 0.0
    assert 0.25 < upper < 0.35
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_accuracy_coverage_and_delay_per_version_and_role() -> None:
    window = logged(
        versions=["1"] * 6 + ["2"] * 4,
        roles=["champion"] * 6 + ["shadow"] * 4,
        predicted=[1, 1, 2, 2, 3, 3, 1, 2, 2, 3],
        truth=[1, 1, 2, 9, NO_LABEL, NO_LABEL, 1, 2, 9, NO_LABEL],
    )
    champion, shadow = online_quality(window)
    assert champion.key == ("1", "champion")
    assert champion.accuracy is not None
    assert (champion.accuracy.successes, champion.accuracy.trials) == (3, 4)
    assert champion.label_coverage == pytest.approx(4 / 6)
    assert champion.label_delay_seconds == pytest.approx(2.0)
    assert shadow.key == ("2", "shadow")
    assert shadow.accuracy is not None
    assert shadow.accuracy.value == pytest.approx(2 / 3)


def test_a_version_without_labels_has_no_accuracy() -> None:
    [quality] = online_quality(logged(["1"] * 3, ["champion"] * 3, [1, 2, 3], [NO_LABEL] * 3))
    assert quality.accuracy is None
    assert quality.label_coverage == 0.0
    assert quality.label_delay_seconds is None


def test_compare_finds_a_real_difference_and_not_a_tiny_one() -> None:
    better, worse = Proportion.of(190, 200), Proportion.of(120, 200)
    difference, lower, upper, p_value = compare(worse, better)
    assert difference == pytest.approx(-0.35)
    assert lower < difference < upper < 0
    assert p_value < 1e-10
    difference, lower, upper, p_value = compare(Proportion.of(96, 100), Proportion.of(97, 100))
    assert lower < 0 < upper
    assert p_value > 0.5


def test_challengers_are_compared_with_the_champion_of_the_period() -> None:
    predicted = [1] * 40 + [1] * 40
    truth = [1] * 38 + [2] * 2 + [1] * 20 + [2] * 20
    window = logged(["1"] * 40 + ["2"] * 40, ["champion"] * 40 + ["canary"] * 40, predicted, truth)
    [comparison] = compare_challengers(online_quality(window))
    assert (comparison.champion_version, comparison.challenger_version) == ("1", "2")
    assert comparison.challenger_role == "canary"
    assert comparison.difference == pytest.approx(0.5 - 0.95)
    assert comparison.confidently_worse(margin=0.1)
    assert not comparison.confidently_worse(margin=0.5)


def test_the_report_is_json_ready() -> None:
    window = logged(["1"] * 3, ["champion"] * 3, [1, 2, 3], [1, NO_LABEL, NO_LABEL])
    document = assess_quality(window).to_dict()
    assert document["window_size"] == 3
    [version] = document["versions"]
    assert version["accuracy"]["successes"] == 1
    assert document["estimates"] == []


def test_a_sampled_window_counts_what_it_stands_for() -> None:
    import dataclasses

    from opsloop.monitor.quality import assess_quality

    window = logged(["1"] * 4, ["champion"] * 4, [1, 2, 3, 4], [1, 2, 3, NO_LABEL])
    sampled = dataclasses.replace(window, sample_rates=np.array([0.1, 0.1, 0.5, 1.0]))
    report = assess_quality(sampled)
    assert report.window_size == 4
    assert report.window_served == pytest.approx(10 + 10 + 2 + 1)
