"""Bundle verification: a missing, tampered or malformed bundle file is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opsloop.bundle import load_bundle
from opsloop.errors import BundleError
from opsloop.export import ExportResult


@pytest.fixture
def copy(bundle: ExportResult, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle.path, target)
    return target


def test_a_good_bundle_loads(copy: Path) -> None:
    loaded = load_bundle(copy)
    assert loaded.manifest.num_classes == 10
    assert loaded.model_path.is_file()


@pytest.mark.parametrize("name", ["model.onnx", "reference.npz", "MODEL_CARD.md"])
def test_missing_file_is_named(copy: Path, name: str) -> None:
    (copy / name).unlink()
    with pytest.raises(BundleError, match=rf"{name} is missing") as info:
        load_bundle(copy)
    assert "\n" not in str(info.value)


def test_tampered_file_fails_its_checksum(copy: Path) -> None:
    model = copy / "model.int8.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match=r"model\.int8\.onnx fails its checksum"):
        load_bundle(copy)


def test_missing_bundle_json_and_directory(copy: Path, tmp_path: Path) -> None:
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"has no bundle\.json"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_malformed_bundle_json_names_the_field(copy: Path) -> None:
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["input"]
    manifest["surprise"] = 1
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="is invalid at"):
        load_bundle(copy)


def test_bundle_without_reference_says_so(copy: Path) -> None:
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["files"]["reference.npz"]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no reference data"):
        load_bundle(copy).load_reference()
