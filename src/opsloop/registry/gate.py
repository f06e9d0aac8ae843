"""The promotion gate: score challenger and champion on the same holdout, move `champion` or not.

`promote_model` scores both versions' bundles with ONNX Runtime (the serving engine) on the same
frozen holdout split; the challenger takes `champion` only if its median latency fits the budget
and its accuracy trails by at most the configured margin. Every decision, forced or gated, is
recorded as version tags and in the registered model's promotion history.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from dataclasses import asdict, dataclass
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
) -> PromotionDecision:
    """Gate `version` (default: challenger) against the champion; move `champion` if it passes."""
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
    contest = Contest(
        challenger,
        champion,
        _score_version(challenger, tracking_uri, cache_dir, images, labels, cfg),
        None
        if champion is None
        else _score_version(champion, tracking_uri, cache_dir, images, labels, cfg),
    )
    decision = _decide(cfg, contest, forced=force, holdout=holdout_name)
    _record(decision, tracking_uri)
    return decision


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
class Contest:
    """The versions the gate compares, with their holdout scores (None where not scored)."""

    challenger: VersionInfo
    champion: VersionInfo | None
    challenger_score: BundleScore | None = None
    champion_score: BundleScore | None = None


def _decide(
    cfg: RegistryConfig, contest: Contest, *, forced: bool, holdout: str, same: bool = False
) -> PromotionDecision:
    promoted, reason = _verdict(cfg, contest, forced=forced, same=same)
    chall, champ = contest.challenger_score, contest.champion_score
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
    )


def _verdict(
    cfg: RegistryConfig, contest: Contest, *, forced: bool, same: bool
) -> tuple[bool, str]:
    if same:
        return False, f"version {contest.challenger.version} is already the champion"
    gated, why = gate_verdict(cfg, contest)
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
    if gap > cfg.accuracy_margin:
        return False, (
            f"holdout accuracy {chall.accuracy:.4f} trails champion v{champion.version}'s "
            f"{champ.accuracy:.4f} by {gap:.4f}, more than the margin {cfg.accuracy_margin:.4f}"
        )
    return True, (
        f"holdout accuracy {chall.accuracy:.4f} vs champion v{champion.version}'s "
        f"{champ.accuracy:.4f} (margin {cfg.accuracy_margin:.4f}); latency "
        f"{chall.latency_ms:.2f} ms within {cfg.latency_budget_ms:.2f} ms"
    )


def _gate_word(promoted: bool) -> str:
    return "promoted" if promoted else "refused"


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def _record(decision: PromotionDecision, tracking_uri: str) -> None:
    """Write the decision as version tags and history, then move the alias if promoted."""
    client = registry_client(tracking_uri)
    tags = {
        "promotion.decision": "promoted" if decision.promoted else "refused",
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
            client.set_model_version_tag(decision.name, decision.challenger_version, key, value)
        history = promotion_history(decision.name, tracking_uri)
        history.append(asdict(decision))
        client.set_registered_model_tag(
            decision.name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:])
        )
        if decision.promoted:
            client.set_registered_model_alias(decision.name, CHAMPION, decision.challenger_version)
    logger.info(
        "%s v%s %s: %s",
        decision.name,
        decision.challenger_version,
        tags["promotion.decision"],
        decision.reason,
    )
