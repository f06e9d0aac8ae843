"""Registered models and their versions in MLflow's registry: register, look up, list, describe.

References are `NAME`, `NAME@ALIAS` or `NAME/VERSION`; an unknown one is a `ModelNotFoundError`
that lists what exists. Aliases (`challenger`, `champion`) are read from the registered model's own
alias map, the source of truth (MLflow's version search returns versions without them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opsloop.errors import (
    ConfigError,
    ModelNotFoundError,
    TrackingError,
    first_line,
    redact_url,
)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "opsloop.promotions"
MISSING = "RESOURCE_DOES_NOT_EXIST"  # MLflow's error code for an absent model or version


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


def registry_client(tracking_uri: str) -> Any:
    """An MLflow client of the tracking store and its registry."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def registry_errors(tracking_uri: str) -> AbstractContextManager[None]:
    """MLflow's registry errors as one-line `TrackingError`s naming the (redacted) store."""
    from opsloop.tracking import tracking_errors

    return tracking_errors(tracking_uri, store="the registry at")


def _version_info(version: Any, aliases: Mapping[str, str] | None = None) -> VersionInfo:
    """A version as we describe it; `aliases` (alias -> version) fills in what a search omits.

    MLflow's version search returns versions without their aliases, while single-version reads
    include them; the registered model's own alias map is the source of truth for both.
    """
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
    own = set(version.aliases or [])
    if aliases is not None:
        own |= {alias for alias, number in aliases.items() if str(number) == str(version.version)}
    return VersionInfo(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id,
        aliases=sorted(own),
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

    from opsloop.tracking import MODEL_URI_TAG, run_lineage

    lineage = run_lineage(run_id, tracking_uri)  # fails clearly for an unknown run
    lineage_keys = ("dataset_hash", "config_hash", "git_commit")
    version_tags: dict[str, str] = {k: lineage[k] for k in lineage_keys if k in lineage}
    version_tags |= dict(tags or {})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        source = lineage.get(MODEL_URI_TAG, f"runs:/{run_id}/model")
        version = mlflow.register_model(source, name, tags=version_tags)
    except MlflowException as exc:
        raise TrackingError(
            f"cannot register run {run_id} as '{name}': {first_line(exc)}; "
            "register a run made by `opsloop train` with logger.log_model=true"
        ) from exc
    client = registry_client(tracking_uri)
    if alias:
        with registry_errors(tracking_uri):
            client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return get_version(ModelRef(name, version=str(version.version)), tracking_uri)


def delete_version(info: VersionInfo, tracking_uri: str) -> None:
    """Remove a version again (a registration whose bundle could not be made)."""
    with registry_errors(tracking_uri):
        registry_client(tracking_uri).delete_model_version(info.name, info.version)
    logger.info("deleted %s version %s", info.name, info.version)


def get_version(ref: ModelRef | str, tracking_uri: str) -> VersionInfo:
    """The version a reference names; a clear ModelNotFoundError when it does not exist."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if not ref.alias and not ref.version:
        return get_version(ModelRef(ref.name, alias=CHAMPION), tracking_uri)
    client = registry_client(tracking_uri)
    aliases = _require_registered_model(client, ref.name, tracking_uri).aliases or {}
    if ref.alias and ref.alias not in aliases:
        raise ModelNotFoundError(_missing_message(client, ref))
    number = str(aliases[ref.alias]) if ref.alias else str(ref.version)
    try:
        version = client.get_model_version(ref.name, number)
    except MlflowException as exc:
        if exc.error_code != MISSING:
            raise TrackingError(
                f"the registry at {redact_url(tracking_uri)} failed: {first_line(exc)}"
            ) from exc
        raise ModelNotFoundError(_missing_message(client, ref)) from exc
    return _version_info(version, aliases)


def _require_registered_model(client: Any, name: str, tracking_uri: str) -> Any:
    """The registered model `name`; a ModelNotFoundError listing the known ones if absent."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != MISSING:
            raise TrackingError(
                f"the registry at {redact_url(tracking_uri)} failed: {first_line(exc)}"
            ) from exc
        names = sorted(m.name for m in client.search_registered_models())
        known = f"registered models: {', '.join(names)}" if names else "the registry is empty"
        raise ModelNotFoundError(
            f"no registered model '{name}' in {redact_url(tracking_uri)} ({known}); "
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
    client = registry_client(tracking_uri)
    aliases = _require_registered_model(client, name, tracking_uri).aliases or {}
    with registry_errors(tracking_uri):
        found = client.search_model_versions(f"name='{name}'")
    infos = [_version_info(v, aliases) for v in found]
    return sorted(infos, key=lambda info: int(info.version), reverse=True)


def list_models(tracking_uri: str) -> dict[str, list[VersionInfo]]:
    """All registered models with their versions."""
    client = registry_client(tracking_uri)
    with registry_errors(tracking_uri):
        names = sorted(model.name for model in client.search_registered_models())
    return {name: list_versions(name, tracking_uri) for name in names}


def promotion_history(name: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Every recorded promotion decision for `name`, oldest first."""
    with registry_errors(tracking_uri):
        model = registry_client(tracking_uri).get_registered_model(name)
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
