"""The rollback watch: after a promotion, the new champion must do live what the old one did.

Each monitor check, `RollbackWatch.step(window)` looks up the registry's latest move of
`champion`. If it was a promotion (not a rollback) whose previous champion answered in the window,
it compares the two on the window's labelled answers: when the new champion's accuracy is worse
than the previous one's by more than the margin with confidence (the 95% interval of the
difference lies wholly below -margin), or its 95th-percentile latency grew beyond the allowed
factor, `champion` moves back to the previous version. The decision and its evidence are recorded
in the registry's promotion history like every promotion; servers following the alias swap back
at their next poll, without a failed request (the hot swap of `opsloop serve`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opsloop.monitor.quality import VersionQuality, compare, online_quality
from opsloop.predictions import CHAMPION_ROLE, LoggedPredictions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchRules:
    """When a new champion is moved back."""

    margin: float = 0.02  # accuracy it may lose against the previous champion
    min_labels: int = 50  # labelled answers each side needs before accuracy is judged
    latency_factor: float = 2.0  # p95 latency it may reach, as a multiple of the previous p95
    min_latency_rows: int = 100  # answers each side needs before latency is judged


@dataclass(frozen=True)
class Verdict:
    """What the watch concluded about one promotion, with the figures it used."""

    rollback: bool
    reason: str
    new_version: str
    previous_version: str
    evidence: dict[str, Any]


def judge(
    new: VersionQuality, previous: VersionQuality, rules: WatchRules
) -> tuple[bool, str, dict[str, Any]]:
    """(roll back?, why, evidence) for a new champion's window against the previous one's."""
    evidence: dict[str, Any] = {
        "new": {"labelled": new.labelled, "predictions": new.predictions},
        "previous": {"labelled": previous.labelled, "predictions": previous.predictions},
    }
    if new.accuracy is not None and previous.accuracy is not None:
        enough = min(new.labelled, previous.labelled) >= rules.min_labels
        difference, lower, upper, p_value = compare(new.accuracy, previous.accuracy)
        evidence["accuracy"] = {
            "new": new.accuracy.value,
            "previous": previous.accuracy.value,
            "difference": difference,
            "interval": [lower, upper],
            "p_value": p_value,
        }
        if enough and upper < -rules.margin:
            return (
                True,
                (
                    f"live accuracy {new.accuracy.value:.3f} on {new.labelled} labels vs "
                    f"{previous.accuracy.value:.3f} on {previous.labelled} for v"
                    f"{previous.model_version}: worse by {-difference:.3f} (95% interval "
                    f"{lower:+.3f}..{upper:+.3f}), beyond the margin {rules.margin:.3f}"
                ),
                evidence,
            )
    evidence["latency_p95_ms"] = {"new": new.latency_ms_p95, "previous": previous.latency_ms_p95}
    enough_rows = min(new.predictions, previous.predictions) >= rules.min_latency_rows
    if enough_rows and new.latency_ms_p95 > rules.latency_factor * previous.latency_ms_p95:
        return (
            True,
            (
                f"p95 latency {new.latency_ms_p95:.1f} ms vs {previous.latency_ms_p95:.1f} ms for v"
                f"{previous.model_version}, more than {rules.latency_factor:g}x"
            ),
            evidence,
        )
    return False, "no worse than the previous champion so far", evidence


class RollbackWatch:
    """Guards the registry model `model_name`'s champion; `step` may move it back."""

    def __init__(self, model_name: str, tracking_uri: str, rules: WatchRules) -> None:
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.rules = rules
        self.decided: set[str] = set()  # promotions (by their time) already rolled back

    def step(self, window: LoggedPredictions) -> Verdict | None:
        """Judge the latest promotion on `window`; roll it back if it is worse. None when
        there is nothing to judge (no promotion, no previous champion in the window)."""
        from opsloop.registry.gate import PROMOTION, last_promotion, rollback_champion

        event = last_promotion(self.model_name, self.tracking_uri)
        if event is None or event.get("kind", PROMOTION) != PROMOTION:
            return None
        new_version, previous_version = event["challenger_version"], event.get("champion_version")
        key = f"{new_version}@{event.get('at')}"
        if previous_version is None or key in self.decided:
            return None
        quality = {q.model_version: q for q in online_quality(window) if q.role == CHAMPION_ROLE}
        if new_version not in quality or previous_version not in quality:
            return None
        rollback, reason, evidence = judge(
            quality[new_version], quality[previous_version], self.rules
        )
        verdict = Verdict(rollback, reason, new_version, previous_version, evidence)
        if rollback:
            rollback_champion(
                self.model_name, previous_version, reason, self.tracking_uri, evidence=evidence
            )
            self.decided.add(key)
            logger.warning(
                "rolled %s back from v%s to v%s: %s",
                self.model_name,
                new_version,
                previous_version,
                reason,
            )
        return verdict
