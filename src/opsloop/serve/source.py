"""Where the served model comes from: a bundle directory, or the registry's alias.

A `ModelSource` answers two questions, both cheap enough to ask every poll: which bundle directory
should be served now (`locate`), and has its content changed (`fingerprint`). The registry source
imports `opsloop.registry` (and with it MLflow) only when it is used, so serving a bundle path
never loads the tracking stack.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from opsloop.bundle import BUNDLE_JSON
from opsloop.errors import BundleError, ConfigError
from opsloop.serve.settings import ServeSettings
from opsloop.workspace import Workspace


class ModelSource(Protocol):
    """Names the bundle to serve; `locate` may materialise it (e.g. from the registry)."""

    def describe(self) -> str: ...

    def locate(self) -> Path: ...


class BundlePathSource:
    """A fixed bundle directory; a re-export into it (an atomic directory swap) is picked up."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"bundle {self.path}"

    def locate(self) -> Path:
        return self.path


class RegistrySource:
    """The bundle of `model_name@alias` in the model registry (the alias moves on promotion).

    The registry is the workspace's MLflow store (or `$OPSLOOP_TRACKING_URI`); bundles are
    cached per version under `<workspace>/.opsloop/bundles`, so polling an alias that has not
    moved downloads nothing.
    """

    def __init__(self, model_name: str, alias: str, workspace: Path) -> None:
        self.model_name = model_name
        self.alias = alias
        self.workspace = workspace

    def describe(self) -> str:
        return f"registry model {self.model_name}@{self.alias}"

    def locate(self) -> Path:
        # Imported here: the registry brings MLflow (seconds to import), needed by this source only.
        try:
            from opsloop.config import LoggerConfig
            from opsloop.registry import resolve_bundle
            from opsloop.tracking import resolve_tracking_uri
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"the model registry is not available ({exc}); install opsloop with the 'train' "
                "extra or set OPSLOOP_BUNDLE_PATH to an exported bundle"
            ) from exc
        tracking_uri = resolve_tracking_uri(LoggerConfig(), self.workspace)
        cache = Workspace(self.workspace).bundle_cache
        path, _version = resolve_bundle(self.model_name, self.alias, tracking_uri, cache)
        return path


def source_from_settings(settings: ServeSettings) -> ModelSource:
    """The champion's source: the bundle path, else the registry alias."""
    if settings.bundle_path is not None:
        return BundlePathSource(settings.bundle_path)
    return RegistrySource(settings.model_name, settings.model_alias, settings.workspace)


def candidate_source(settings: ServeSettings) -> ModelSource | None:
    """The candidate's source when shadow or canary is on: its bundle path, else its alias."""
    if not settings.candidate_enabled:
        return None
    if settings.candidate_bundle_path is not None:
        return BundlePathSource(settings.candidate_bundle_path)
    return RegistrySource(settings.model_name, settings.candidate_alias, settings.workspace)


def fingerprint(bundle_dir: Path) -> str:
    """Identifies a bundle's content: its directory and the hash of its `bundle.json`.

    `bundle.json` lists the SHA-256 of every other file, so any change to the model changes it.
    """
    manifest = bundle_dir / BUNDLE_JSON
    try:
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    except OSError as exc:
        raise BundleError(
            f"cannot read {manifest}: {exc.strerror or exc}; export a bundle there with "
            "`opsloop export` or point OPSLOOP_BUNDLE_PATH at one"
        ) from exc
    return f"{bundle_dir.resolve()}#{digest}"
