"""Model sources: a bundle path or a registry alias, and the fingerprint that spots a new bundle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from opsloop.serve.settings import get_settings, load_settings
from opsloop.serve.source import (
    BundlePathSource,
    RegistrySource,
    fingerprint,
    source_from_settings,
)
from tests.serve.onnx_bundles import write_bundle


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from these arguments alone, not from OPSLOOP_* in the environment."""
    for key in list(os.environ):
        if key.startswith("OPSLOOP_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()


def test_the_source_follows_the_settings(tmp_path: Path) -> None:
    assert isinstance(source_from_settings(load_settings(bundle_path=tmp_path)), BundlePathSource)
    registry = source_from_settings(load_settings(model_name="m", model_alias="challenger"))
    assert isinstance(registry, RegistrySource)
    assert registry.describe() == "registry model m@challenger"


def test_the_fingerprint_changes_when_the_bundle_is_replaced(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", version="1", seed=0)
    first = fingerprint(bundle)
    assert fingerprint(bundle) == first
    write_bundle(bundle, version="2", seed=1)
    assert fingerprint(bundle) != first


def test_a_missing_bundle_json_has_a_clear_message(tmp_path: Path) -> None:
    from opsloop.errors import BundleError

    with pytest.raises(BundleError, match=r"cannot read .*bundle\.json.*opsloop export"):
        fingerprint(tmp_path)


def test_the_registry_source_resolves_the_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop import registry

    calls: list[tuple[Any, ...]] = []

    def resolve(name: str, alias: str, uri: str, cache_dir: Path) -> tuple[Path, str]:
        calls.append((name, alias, uri, cache_dir))
        return tmp_path / "cached" / "v4", "4"

    monkeypatch.setattr(registry, "resolve_bundle", resolve)
    monkeypatch.setenv("OPSLOOP_TRACKING_URI", "sqlite:///somewhere/mlflow.db")
    source = RegistrySource("digits-cnn", "champion", tmp_path)
    assert source.locate() == tmp_path / "cached" / "v4"
    assert calls == [
        (
            "digits-cnn",
            "champion",
            "sqlite:///somewhere/mlflow.db",
            tmp_path / ".opsloop" / "bundles",
        )
    ]
