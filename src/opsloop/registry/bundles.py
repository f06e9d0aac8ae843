"""Model bundles attached to registered versions: stored with the version's run, cached locally.

A version's verified bundle lives among its training run's artifacts (`bundles/v<N>`), named by a
version tag; `download_bundle` materialises it atomically and verifies it, `cached_bundle` keeps
one copy per version so polling an alias that has not moved downloads nothing.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from opsloop.atomic import staged_directory
from opsloop.bundle import Bundle, load_bundle
from opsloop.errors import (
    BundleError,
    ModelNotFoundError,
)
from opsloop.registry.versions import (
    ModelRef,
    VersionInfo,
    get_version,
    registry_client,
    registry_errors,
)

logger = logging.getLogger(__name__)

BUNDLE_TAG = "opsloop.bundle_artifact"


def attach_bundle(info: VersionInfo, bundle_dir: Path, tracking_uri: str) -> str:
    """Store a verified bundle with the version (as artifacts of its run) and tag where it is."""
    load_bundle(bundle_dir)  # never attach a broken bundle
    if info.run_id is None:
        raise ModelNotFoundError(f"{info.name}/{info.version} has no source run to hold a bundle")
    from opsloop.tracking import log_artifacts_to_run

    artifact_path = f"bundles/v{info.version}"
    log_artifacts_to_run(info.run_id, tracking_uri, bundle_dir, artifact_path)
    with registry_errors(tracking_uri):
        registry_client(tracking_uri).set_model_version_tag(
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
        with registry_errors(tracking_uri):
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
