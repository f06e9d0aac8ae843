"""The promotion gate: score challenger and champion on the same holdout, move `champion` or not.

`promote_model` scores both versions' bundles with ONNX Runtime (the serving engine) on the same
frozen holdout split; the challenger takes `champion` only if its median latency fits the budget
and its accuracy trails by at most the configured margin. Every decision, forced or gated, is
recorded as version tags and in the registered model's promotion history.

Why one file of ~470 lines: the gate's checks (holdout scores, latency, guards, live
evidence), the rollback and the promotion record they produce are one decision, recorded one way.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from opsloop.bundle import PROBABILITIES, Bundle, onnx_session, run_onnx
from opsloop.config import DataConfig, RegistryConfig
from opsloop.data import dataset_dir, load_split, read_manifest
from opsloop.errors import (
    BundleError,
    ModelNotFoundError,
)
from opsloop.registry.bundles import cached_bundle
from opsloop.registry.versions import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    ModelRef,
    VersionInfo,
    get_version,
    promotion_history,
    registry_client,
    registry_errors,
)

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 50  # MLflow caps tag values; keep the newest events
PROMOTION, ROLLBACK = "promotion", "rollback"


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate decided and why; also stored as version tags and in the history."""

    promoted: bool
    forced: bool
    reason: str
    name: str
    challenger_version: str
    champion_version: str | None
    challenger_accuracy: float | None
    champion_accuracy: float | None
    challenger_latency_ms: float | None
    accuracy_margin: float
    latency_budget_ms: float
    holdout: str
    at: str
    by: str
    # "promotion" (the gate's decision) or "rollback" (the watch moved `champion` back: then
    # `challenger_version` is the version restored and `champion_version` the one demoted).
    kind: str = PROMOTION
    evidence: dict[str, Any] = field(default_factory=dict)  # live figures the decision used


@dataclass(frozen=True)
class BundleScore:
    accuracy: float
    latency_ms: float


def score_bundle(
    bundle: Bundle,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.int64],
    *,
    latency_samples: int,
) -> BundleScore:
    """Holdout accuracy, and the median single-image latency with one ORT thread."""
    session = onnx_session(bundle.model_path, intra_op_threads=1)
    probabilities = run_onnx(session, images)[PROBABILITIES]
    accuracy = float((probabilities.argmax(1) == labels).mean())
    feed = bundle.manifest.input.name
    single = images[:1].astype(np.float32)
    session.run(None, {feed: single})  # warm-up: the first run allocates
    timings = []
    for index in range(latency_samples):
        image = images[index % len(images)][None].astype(np.float32)
        start = time.perf_counter()
        session.run(None, {feed: image})
        timings.append((time.perf_counter() - start) * 1000)
    return BundleScore(accuracy, float(np.median(timings)))


def promote_model(
    name: str,
    cfg: RegistryConfig,
    data: DataConfig,
    tracking_uri: str,
    *,
    cache_dir: Path,
    version: str | None = None,
    force: bool = False,
    evidence: EvidenceSource | None = None,
    guards: Sequence[Guard] = (),
    by: str | None = None,
) -> PromotionDecision:
    """Gate `version` (default: challenger) against the champion; move `champion` if it passes.

    With `cfg.live_min_labels > 0` the gate also needs live evidence, which `evidence` reads
    (from the prediction log: `opsloop.monitor.quality.live_evidence`). Each of `guards` is a
    further holdout the challenger must not trail the champion on by more than its margin (the
    loop keeps the original test split as one, so retraining on new data cannot silently trade
    the old world away).
    """
    challenger = get_version(
        ModelRef(name, version=version) if version else ModelRef(name, alias=CHALLENGER),
        tracking_uri,
    )
    champion = _current_champion(name, tracking_uri)
    holdout = _holdout(data, cfg.holdout_split)
    if champion is not None and champion.version == challenger.version:
        # Nothing to decide, and nothing to record: the version's promotion tags stay as they are.
        contest = Contest(challenger, champion)
        return _decide(cfg, contest, forced=force, holdout=holdout[2], same=True)
    images, labels, holdout_name = holdout
    live = None
    if cfg.live_min_labels > 0 and champion is not None and evidence is not None:
        live = evidence(challenger.version, champion.version)
    contest = Contest(
        challenger,
        champion,
        _score_version(challenger, tracking_uri, cache_dir, images, labels, cfg),
        None
        if champion is None
        else _score_version(champion, tracking_uri, cache_dir, images, labels, cfg),
        live,
        [guard.score(challenger, champion, tracking_uri, cache_dir, cfg) for guard in guards],
    )
    decision = _decide(cfg, contest, forced=force, holdout=holdout_name)
    if by is not None:
        decision = dataclasses.replace(decision, by=by)
    _record(decision, tracking_uri)
    return decision


@dataclass(frozen=True)
class Guard:
    """A further holdout (`data`'s `split`) the challenger may trail the champion on by at most
    `margin`."""

    data: DataConfig
    margin: float
    split: str = "test"

    def score(
        self,
        challenger: VersionInfo,
        champion: VersionInfo | None,
        tracking_uri: str,
        cache_dir: Path,
        cfg: RegistryConfig,
    ) -> GuardResult:
        images, labels, name = _holdout(self.data, self.split)
        mine = _score_version(challenger, tracking_uri, cache_dir, images, labels, cfg)
        theirs = (
            None
            if champion is None
            else _score_version(champion, tracking_uri, cache_dir, images, labels, cfg).accuracy
        )
        return GuardResult(name, self.margin, mine.accuracy, theirs)


@dataclass(frozen=True)
class GuardResult:
    """Both versions' accuracy on one guard holdout."""

    holdout: str
    margin: float
    challenger_accuracy: float
    champion_accuracy: float | None

    def verdict(self) -> str | None:
        """Why the guard refuses, or None when it passes."""
        if self.champion_accuracy is None:
            return None
        gap = self.champion_accuracy - self.challenger_accuracy
        if gap <= self.margin:
            return None
        return (
            f"on {self.holdout} its accuracy {self.challenger_accuracy:.4f} trails the "
            f"champion's {self.champion_accuracy:.4f} by {gap:.4f}, more than {self.margin:.4f}"
        )


def _current_champion(name: str, tracking_uri: str) -> VersionInfo | None:
    try:
        return get_version(ModelRef(name, alias=CHAMPION), tracking_uri)
    except ModelNotFoundError:
        return None


def _holdout(data: DataConfig, split: str) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], str]:
    path = dataset_dir(data)
    manifest = read_manifest(path)
    arrays = load_split(path, split)
    return arrays.images, arrays.labels, f"{manifest.name}/{split}@{manifest.content_hash[:12]}"


def _score_version(
    info: VersionInfo,
    tracking_uri: str,
    cache_dir: Path,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.int64],
    cfg: RegistryConfig,
) -> BundleScore:
    bundle = cached_bundle(info, tracking_uri, cache_dir)
    shape = bundle.manifest.input.shape[1:]
    if list(images.shape[1:]) != shape:
        raise BundleError(
            f"{info.name}/{info.version} takes images {shape} but the holdout has "
            f"{list(images.shape[1:])}; promote with the data=... it was trained on"
        )
    return score_bundle(bundle, images, labels, latency_samples=cfg.latency_samples)


@dataclass(frozen=True)
class LiveEvidence:
    """The challenger's live answers (shadow or canary) against the champion's, same period."""

    role: str
    challenger_labelled: int
    champion_labelled: int
    challenger_accuracy: float
    champion_accuracy: float
    difference: float  # challenger minus champion
    lower: float  # 95% interval of the difference
    upper: float


# (challenger version, champion version) -> their live evidence, or None when there is none.
EvidenceSource = Callable[[str, str], LiveEvidence | None]


@dataclass(frozen=True)
class Contest:
    """The versions the gate compares, with their holdout scores (None where not scored)."""

    challenger: VersionInfo
    champion: VersionInfo | None
    challenger_score: BundleScore | None = None
    champion_score: BundleScore | None = None
    live: LiveEvidence | None = None
    guards: list[GuardResult] = field(default_factory=list)


def _decide(
    cfg: RegistryConfig, contest: Contest, *, forced: bool, holdout: str, same: bool = False
) -> PromotionDecision:
    promoted, reason = _verdict(cfg, contest, forced=forced, same=same)
    chall, champ = contest.challenger_score, contest.champion_score
    evidence: dict[str, Any] = {} if contest.live is None else {"live": asdict(contest.live)}
    if contest.guards:
        evidence["guards"] = [asdict(guard) for guard in contest.guards]
    return PromotionDecision(
        promoted=promoted,
        forced=forced,
        reason=reason,
        name=contest.challenger.name,
        challenger_version=contest.challenger.version,
        champion_version=contest.champion.version if contest.champion else None,
        challenger_accuracy=chall.accuracy if chall else None,
        champion_accuracy=champ.accuracy if champ else None,
        challenger_latency_ms=chall.latency_ms if chall else None,
        accuracy_margin=cfg.accuracy_margin,
        latency_budget_ms=cfg.latency_budget_ms,
        holdout=holdout,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        by=_who(),
        evidence=evidence,
    )


def _verdict(
    cfg: RegistryConfig, contest: Contest, *, forced: bool, same: bool
) -> tuple[bool, str]:
    if same:
        return False, f"version {contest.challenger.version} is already the champion"
    gated, why = gate_verdict(cfg, contest)
    refusals = [reason for guard in contest.guards if (reason := guard.verdict()) is not None]
    if gated and refusals:
        gated, why = False, f"{why}; but {'; and '.join(refusals)}"
    if forced:
        return True, f"forced with --force (the gate would have {_gate_word(gated)}: {why})"
    return gated, why


def gate_verdict(cfg: RegistryConfig, contest: Contest) -> tuple[bool, str]:
    """The offline gate: the challenger's latency must fit the budget, then its accuracy may
    trail the champion's by at most the margin. (promoted?, the reason in one sentence)."""
    chall, champ = contest.challenger_score, contest.champion_score
    if chall is None:
        raise AssertionError("the gate needs the challenger's score")
    if chall.latency_ms > cfg.latency_budget_ms:
        return False, (
            f"median latency {chall.latency_ms:.2f} ms exceeds the budget of "
            f"{cfg.latency_budget_ms:.2f} ms"
        )
    champion = contest.champion
    if champion is None or champ is None:
        return True, f"first champion (holdout accuracy {chall.accuracy:.4f})"
    gap = champ.accuracy - chall.accuracy
    if gap > cfg.accuracy_margin and cfg.accuracy_margin < 0:  # it must be better (the loop's gate)
        return False, (
            f"holdout accuracy {chall.accuracy:.4f} is not better than champion "
            f"v{champion.version}'s {champ.accuracy:.4f} by the required "
            f"{-cfg.accuracy_margin:.4f}"
        )
    if gap > cfg.accuracy_margin:
        return False, (
            f"holdout accuracy {chall.accuracy:.4f} trails champion v{champion.version}'s "
            f"{champ.accuracy:.4f} by {gap:.4f}, more than the margin {cfg.accuracy_margin:.4f}"
        )
    offline = (
        f"holdout accuracy {chall.accuracy:.4f} vs champion v{champion.version}'s "
        f"{champ.accuracy:.4f} (margin {cfg.accuracy_margin:.4f}); latency "
        f"{chall.latency_ms:.2f} ms within {cfg.latency_budget_ms:.2f} ms"
    )
    if cfg.live_min_labels <= 0:
        return True, offline
    return live_verdict(cfg, contest.live, offline)


def live_verdict(cfg: RegistryConfig, live: LiveEvidence | None, offline: str) -> tuple[bool, str]:
    """The live half of the gate: enough labelled live answers, and not worse beyond the margin."""
    need = cfg.live_min_labels
    if live is None or live.challenger_labelled < need:
        have = 0 if live is None else live.challenger_labelled
        return False, (
            f"{offline}; but live evidence is missing: {have} labelled shadow/canary answers of "
            f"the {need} required (run the server with OPSLOOP_SHADOW=true or a canary, and post "
            "labels to /feedback)"
        )
    if live.difference < -cfg.live_margin:
        return False, (
            f"{offline}; but live {live.role} accuracy {live.challenger_accuracy:.4f} on "
            f"{live.challenger_labelled} labels trails the champion's "
            f"{live.champion_accuracy:.4f} by {-live.difference:.4f}, more than the live margin "
            f"{cfg.live_margin:.4f}"
        )
    return True, (
        f"{offline}; live {live.role} accuracy {live.challenger_accuracy:.4f} vs "
        f"{live.champion_accuracy:.4f} on {live.challenger_labelled} labels "
        f"({live.difference:+.4f}, 95% {live.lower:+.4f}..{live.upper:+.4f})"
    )


def _gate_word(promoted: bool) -> str:
    return "promoted" if promoted else "refused"


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def rollback_champion(
    name: str,
    to_version: str,
    reason: str,
    tracking_uri: str,
    *,
    evidence: dict[str, Any] | None = None,
    by: str = "opsloop monitor (rollback watch)",
) -> PromotionDecision:
    """Move `champion` back to `to_version`, recorded in the history like every promotion.

    The demoted version gets `promotion.decision=rolled_back` and the reason as tags; servers
    following the alias swap back at their next poll.
    """
    current = get_version(ModelRef(name, alias=CHAMPION), tracking_uri)
    restored = get_version(ModelRef(name, version=to_version), tracking_uri)
    decision = PromotionDecision(
        promoted=True,
        forced=False,
        reason=f"rolled back from v{current.version}: {reason}",
        name=name,
        challenger_version=restored.version,
        champion_version=current.version,
        challenger_accuracy=None,
        champion_accuracy=None,
        challenger_latency_ms=None,
        accuracy_margin=0.0,
        latency_budget_ms=0.0,
        holdout="live traffic",
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        by=by,
        kind=ROLLBACK,
        evidence=dict(evidence or {}),
    )
    _record(decision, tracking_uri)
    return decision


def _record(decision: PromotionDecision, tracking_uri: str) -> None:
    """Write the decision as version tags and history, then move the alias if promoted.

    A gate decision is tagged on the challenger; a rollback on the version it demotes.
    """
    client = registry_client(tracking_uri)
    rollback = decision.kind == ROLLBACK
    tagged = decision.champion_version if rollback else decision.challenger_version
    verdict = "promoted" if decision.promoted else "refused"
    tags = {
        "promotion.decision": "rolled_back" if rollback else verdict,
        "promotion.forced": str(decision.forced).lower(),
        "promotion.reason": decision.reason,
        "promotion.at": decision.at,
        "promotion.by": decision.by,
        "promotion.holdout": decision.holdout,
        "promotion.champion_version": decision.champion_version or "none",
    }
    for key in ("challenger_accuracy", "champion_accuracy", "challenger_latency_ms"):
        value = getattr(decision, key)
        if value is not None:
            tags[f"promotion.{key}"] = f"{value:.6f}"
    with registry_errors(tracking_uri):
        for key, value in tags.items():
            client.set_model_version_tag(decision.name, tagged, key, value)
        history = promotion_history(decision.name, tracking_uri)
        history.append(asdict(decision))
        client.set_registered_model_tag(
            decision.name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:])
        )
        if decision.promoted:
            client.set_registered_model_alias(decision.name, CHAMPION, decision.challenger_version)
    if rollback:
        logger.warning(
            "%s: champion moved back from v%s to v%s: %s",
            decision.name,
            decision.champion_version,
            decision.challenger_version,
            decision.reason,
        )
    else:
        logger.info(
            "%s v%s %s: %s",
            decision.name,
            decision.challenger_version,
            tags["promotion.decision"],
            decision.reason,
        )


def last_promotion(name: str, tracking_uri: str) -> dict[str, Any] | None:
    """The newest event that moved `champion` (a promotion or a rollback), or None."""
    moved = [event for event in promotion_history(name, tracking_uri) if event.get("promoted")]
    return moved[-1] if moved else None
