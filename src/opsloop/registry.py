"""The model registry: versions, the `challenger`/`champion` aliases and a gated promotion.

The one module that talks to MLflow's model registry (runs go through `opsloop.tracking`).

    opsloop register --run-id RUN          # new version of registry.model_name, alias challenger
    opsloop promote digits-cnn             # gate the challenger against the champion
    opsloop models show digits-cnn@champion

`promote_model` scores the challenger's and the champion's bundles with ONNX Runtime on the same
frozen holdout split; the challenger takes `champion` only if its accuracy trails by at most the
configured margin and its median latency fits the budget. Every decision, forced or gated, is
recorded as version tags and in the registered model's promotion history.
"""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from opsloop.atomic import staged_directory
from opsloop.bundle import PROBABILITIES, Bundle, load_bundle, onnx_session, run_onnx
from opsloop.config import DataConfig, RegistryConfig
from opsloop.data import dataset_dir, load_split, read_manifest
from opsloop.errors import BundleError, ConfigError, ModelNotFoundError, TrackingError

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "opsloop.promotions"
BUNDLE_TAG = "opsloop.bundle_artifact"
HISTORY_LIMIT = 50  # MLflow caps tag values; keep the newest events


@dataclass(frozen=True)
class ModelRef:
    """`name`, `name@alias` or `name/version`."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}" if self.version else self.name


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version."""

    name: str
    version: str
    run_id: str | None
    aliases: list[str]
    tags: dict[str, str]
    created_at: str


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
class ModelDescription:
    """Everything `opsloop models show` prints about a version."""

    version: VersionInfo
    lineage: dict[str, str]
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def parse_model_ref(text: str) -> ModelRef:
    """Parse `name`, `name@alias` or `name/version`; anything else is a ConfigError."""
    if "@" in text:
        name, alias = text.split("@", 1)
        ref = ModelRef(name, alias=alias)
    elif "/" in text:
        name, version = text.split("/", 1)
        if not version.isdigit():
            raise ConfigError(f"'{text}': a version must be a number, as in {name}/3")
        ref = ModelRef(name, version=version)
    else:
        ref = ModelRef(text)
    if not ref.name or (ref.alias is not None and not ref.alias):
        raise ConfigError(
            f"'{text}' is not a model reference; use NAME, NAME@ALIAS or NAME/VERSION"
        )
    return ref


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextmanager
def _registry_errors(tracking_uri: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"the registry at {tracking_uri} refused a request: {first}") from exc


def _is_missing(exc: Exception) -> bool:
    return (
        getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
        or "not found" in str(exc).lower()
    )


def _version_info(version: Any) -> VersionInfo:
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
    return VersionInfo(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id,
        aliases=sorted(version.aliases or []),
        tags=dict(version.tags or {}),
        created_at=created.isoformat(timespec="seconds"),
    )


def register_model(
    run_id: str,
    name: str,
    tracking_uri: str,
    *,
    alias: str | None = CHALLENGER,
    tags: Mapping[str, str] | None = None,
) -> VersionInfo:
    """Register run `run_id`'s logged model as a new version of `name` and point `alias` at it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from opsloop.tracking import run_lineage

    lineage = run_lineage(run_id, tracking_uri)  # fails clearly for an unknown run
    lineage_keys = ("dataset_hash", "config_hash", "git_commit")
    version_tags: dict[str, str] = {k: lineage[k] for k in lineage_keys if k in lineage}
    version_tags |= dict(tags or {})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=version_tags)
    except MlflowException as exc:
        raise TrackingError(
            f"cannot register run {run_id} as '{name}': {str(exc).splitlines()[0]}; "
            "register a run made by `opsloop train` with logger.log_model=true"
        ) from exc
    client = _client(tracking_uri)
    if alias:
        with _registry_errors(tracking_uri):
            client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return get_version(ModelRef(name, version=str(version.version)), tracking_uri)


def get_version(ref: ModelRef | str, tracking_uri: str) -> VersionInfo:
    """The version a reference names; a clear ModelNotFoundError when it does not exist."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    client = _client(tracking_uri)
    _require_registered_model(client, ref.name, tracking_uri)
    try:
        if ref.alias:
            version = client.get_model_version_by_alias(ref.name, ref.alias)
        elif ref.version:
            version = client.get_model_version(ref.name, ref.version)
        else:
            return get_version(ModelRef(ref.name, alias=CHAMPION), tracking_uri)
    except MlflowException as exc:
        if not _is_missing(exc) and "alias" not in str(exc).lower():
            raise TrackingError(f"the registry at {tracking_uri} failed: {exc}") from exc
        raise ModelNotFoundError(_missing_message(client, ref)) from exc
    return _version_info(version)


def _require_registered_model(client: Any, name: str, tracking_uri: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models())
        known = f"registered models: {', '.join(names)}" if names else "the registry is empty"
        raise ModelNotFoundError(
            f"no registered model '{name}' in {tracking_uri} ({known}); "
            "register one with `opsloop register --run-id RUN`"
        ) from exc


def _missing_message(client: Any, ref: ModelRef) -> str:
    versions = sorted(
        (int(v.version) for v in client.search_model_versions(f"name='{ref.name}'")), reverse=True
    )
    listed = ", ".join(str(v) for v in versions) or "none"
    if ref.alias:
        return (
            f"model '{ref.name}' has no alias '{ref.alias}' (versions: {listed}); "
            f"promote one with `opsloop promote {ref.name} --version N`"
        )
    return f"model '{ref.name}' has no version {ref.version} (versions: {listed})"


def list_versions(name: str, tracking_uri: str) -> list[VersionInfo]:
    """Every version of `name`, newest first."""
    client = _client(tracking_uri)
    _require_registered_model(client, name, tracking_uri)
    with _registry_errors(tracking_uri):
        found = client.search_model_versions(f"name='{name}'")
    infos = [_version_info(v) for v in found]
    return sorted(infos, key=lambda info: int(info.version), reverse=True)


def list_models(tracking_uri: str) -> dict[str, list[VersionInfo]]:
    """All registered models with their versions."""
    client = _client(tracking_uri)
    with _registry_errors(tracking_uri):
        names = sorted(model.name for model in client.search_registered_models())
    return {name: list_versions(name, tracking_uri) for name in names}


# --- bundles attached to versions -----------------------------------------------------------


def attach_bundle(info: VersionInfo, bundle_dir: Path, tracking_uri: str) -> str:
    """Store a verified bundle with the version (as artifacts of its run) and tag where it is."""
    load_bundle(bundle_dir)  # never attach a broken bundle
    if info.run_id is None:
        raise ModelNotFoundError(f"{info.name}/{info.version} has no source run to hold a bundle")
    from opsloop.tracking import log_artifacts_to_run

    artifact_path = f"bundles/v{info.version}"
    log_artifacts_to_run(info.run_id, tracking_uri, bundle_dir, artifact_path)
    with _registry_errors(tracking_uri):
        _client(tracking_uri).set_model_version_tag(
            info.name, info.version, BUNDLE_TAG, artifact_path
        )
    return artifact_path


def download_bundle(
    ref: ModelRef | str, tracking_uri: str, dest: Path
) -> tuple[Bundle, VersionInfo]:
    """Materialise a version's bundle into `dest` atomically and verify it."""
    import mlflow.artifacts

    info = get_version(ref, tracking_uri)
    artifact_path = info.tags.get(BUNDLE_TAG)
    if not artifact_path or info.run_id is None:
        raise BundleError(
            f"{info.name}/{info.version} has no bundle; export one with "
            f"`opsloop export --model {info.name}/{info.version}`"
        )
    with tempfile.TemporaryDirectory(prefix="opsloop-bundle-") as scratch:
        with _registry_errors(tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                run_id=info.run_id,
                artifact_path=artifact_path,
                dst_path=scratch,
                tracking_uri=tracking_uri,
            )
        load_bundle(local)  # verify before it replaces anything
        with staged_directory(dest) as staging:
            for item in Path(local).iterdir():
                shutil.copy2(item, staging / item.name)
    return load_bundle(dest), info


def resolve_bundle(name: str, alias: str, tracking_uri: str, cache_dir: Path) -> tuple[Path, str]:
    """The local path of `name@alias`'s bundle (cached per version) and the version: for serving."""
    info = get_version(ModelRef(name, alias=alias), tracking_uri)
    return cached_bundle(info, tracking_uri, cache_dir).path, info.version


def cached_bundle(info: VersionInfo, tracking_uri: str, cache_dir: Path) -> Bundle:
    """A version's bundle under `cache_dir/<name>/v<N>`, downloaded only when absent or broken."""
    target = cache_dir / info.name / f"v{info.version}"
    try:
        return load_bundle(target)
    except BundleError:
        return download_bundle(ModelRef(info.name, version=info.version), tracking_uri, target)[0]


# --- the promotion gate ---------------------------------------------------------------------


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
        return _decide(cfg, challenger, champion, None, None, force, holdout[2], same=True)
    images, labels, holdout_name = holdout
    chall_score = _score_version(challenger, tracking_uri, cache_dir, images, labels, cfg)
    champ_score = (
        _score_version(champion, tracking_uri, cache_dir, images, labels, cfg)
        if champion is not None
        else None
    )
    decision = _decide(cfg, challenger, champion, chall_score, champ_score, force, holdout_name)
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


def _decide(
    cfg: RegistryConfig,
    challenger: VersionInfo,
    champion: VersionInfo | None,
    chall: BundleScore | None,
    champ: BundleScore | None,
    forced: bool,
    holdout: str,
    *,
    same: bool = False,
) -> PromotionDecision:
    promoted, reason = _verdict(cfg, challenger, champion, chall, champ, forced, same)
    return PromotionDecision(
        promoted=promoted,
        forced=forced,
        reason=reason,
        name=challenger.name,
        challenger_version=challenger.version,
        champion_version=champion.version if champion else None,
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
    cfg: RegistryConfig,
    challenger: VersionInfo,
    champion: VersionInfo | None,
    chall: BundleScore | None,
    champ: BundleScore | None,
    forced: bool,
    same: bool,
) -> tuple[bool, str]:
    if same:
        return False, f"version {challenger.version} is already the champion"
    if forced:
        gated, why = _verdict(cfg, challenger, champion, chall, champ, False, False)
        return True, f"forced with --force (the gate would have {_gate_word(gated)}: {why})"
    assert chall is not None
    if chall.latency_ms > cfg.latency_budget_ms:
        return False, (
            f"median latency {chall.latency_ms:.2f} ms exceeds the budget of "
            f"{cfg.latency_budget_ms:.2f} ms"
        )
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
    client = _client(tracking_uri)
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
    with _registry_errors(tracking_uri):
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


def promotion_history(name: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Every recorded promotion decision for `name`, oldest first."""
    with _registry_errors(tracking_uri):
        model = _client(tracking_uri).get_registered_model(name)
    raw = dict(model.tags or {}).get(HISTORY_TAG, "[]")
    try:
        events = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return events if isinstance(events, list) else []


def describe_model(ref: ModelRef | str, tracking_uri: str) -> ModelDescription:
    """Lineage, metrics and promotion history of one version."""
    from opsloop.tracking import run_lineage, run_metrics

    info = get_version(ref, tracking_uri)
    lineage = run_lineage(info.run_id, tracking_uri) if info.run_id else {}
    metrics = run_metrics(info.run_id, tracking_uri) if info.run_id else {}
    history = [
        event
        for event in promotion_history(info.name, tracking_uri)
        if event.get("challenger_version") == info.version
    ]
    return ModelDescription(info, lineage, metrics, history)
