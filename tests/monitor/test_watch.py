"""The rollback watch's rule: confidently worse accuracy, or a latency blow-up, moves back."""

from __future__ import annotations

from opsloop.monitor.quality import Proportion, VersionQuality
from opsloop.monitor.watch import WatchRules, judge


def quality(version: str, correct: int, labelled: int, p95: float = 5.0) -> VersionQuality:
    return VersionQuality(
        model_version=version,
        role="champion",
        predictions=max(labelled, 200),
        labelled=labelled,
        accuracy=Proportion.of(correct, labelled) if labelled else None,
        label_coverage=1.0,
        label_delay_seconds=1.0,
        latency_ms_p50=p95 / 2,
        latency_ms_p95=p95,
        first_at=0.0,
        last_at=1.0,
    )


RULES = WatchRules(margin=0.02, min_labels=50, latency_factor=2.0, min_latency_rows=100)


def test_a_confidently_worse_champion_is_rolled_back() -> None:
    rollback, reason, evidence = judge(quality("2", 30, 100), quality("1", 95, 100), RULES)
    assert rollback
    assert "live accuracy 0.300 on 100 labels vs 0.950 on 100 for v1" in reason
    assert evidence["accuracy"]["interval"][1] < -0.02


def test_a_small_or_uncertain_drop_is_kept() -> None:
    rollback, reason, _ = judge(quality("2", 93, 100), quality("1", 95, 100), RULES)
    assert not rollback
    assert reason == "no worse than the previous champion so far"
    # Even a large drop waits for enough labels.
    assert not judge(quality("2", 5, 20), quality("1", 19, 20), RULES)[0]


def test_a_latency_blow_up_is_rolled_back_without_labels() -> None:
    rollback, reason, evidence = judge(
        quality("2", 0, 0, p95=30.0), quality("1", 0, 0, p95=5.0), RULES
    )
    assert rollback
    assert "p95 latency 30.0 ms vs 5.0 ms for v1, more than 2x" in reason
    assert evidence["latency_p95_ms"] == {"new": 30.0, "previous": 5.0}
