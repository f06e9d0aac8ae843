"""The offline gate's rule on its own: latency first, then accuracy within the margin."""

from __future__ import annotations

import pytest

from opsloop.config import RegistryConfig
from opsloop.registry import BundleScore, VersionInfo
from opsloop.registry.gate import Contest, LiveEvidence, gate_verdict


def version(number: str) -> VersionInfo:
    return VersionInfo("m", number, None, [], {}, "2026-01-01T00:00:00+00:00")


RULES = RegistryConfig(accuracy_margin=0.01, latency_budget_ms=5.0)


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "reason"),
    [
        (BundleScore(0.95, 1.0), None, True, "first champion"),
        (BundleScore(0.95, 9.0), None, False, "median latency 9.00 ms exceeds the budget"),
        (BundleScore(0.99, 9.0), BundleScore(0.90, 1.0), False, "exceeds the budget"),
        (BundleScore(0.95, 1.0), BundleScore(0.955, 1.0), True, "vs champion v1's 0.9550"),
        (BundleScore(0.93, 1.0), BundleScore(0.95, 1.0), False, "trails champion v1's 0.9500"),
    ],
)
def test_the_gate_rule(
    challenger: BundleScore, champion: BundleScore | None, promoted: bool, reason: str
) -> None:
    contest = Contest(version("2"), version("1") if champion else None, challenger, champion)
    decided, why = gate_verdict(RULES, contest)
    assert decided is promoted
    assert reason in why


def live(difference: float, labelled: int = 300) -> LiveEvidence:
    return LiveEvidence(
        role="shadow",
        challenger_labelled=labelled,
        champion_labelled=500,
        challenger_accuracy=0.95 + difference,
        champion_accuracy=0.95,
        difference=difference,
        lower=difference - 0.03,
        upper=difference + 0.03,
    )


LIVE_RULES = RegistryConfig(live_min_labels=200, live_margin=0.02)


@pytest.mark.parametrize(
    ("evidence", "promoted", "reason"),
    [
        (None, False, "live evidence is missing: 0 labelled shadow/canary answers of the 200"),
        (live(0.0, labelled=150), False, "150 labelled shadow/canary answers of the 200"),
        (live(-0.05), False, "live shadow accuracy 0.9000 on 300 labels trails"),
        (live(-0.01), True, "live shadow accuracy 0.9400 vs 0.9500 on 300 labels"),
    ],
)
def test_live_evidence_is_the_second_half_of_the_gate(
    evidence: LiveEvidence | None, promoted: bool, reason: str
) -> None:
    contest = Contest(
        version("2"), version("1"), BundleScore(0.95, 1.0), BundleScore(0.95, 1.0), evidence
    )
    decided, why = gate_verdict(LIVE_RULES, contest)
    assert decided is promoted
    assert reason in why
    assert why.startswith("holdout accuracy 0.9500 vs champion v1's 0.9500")
