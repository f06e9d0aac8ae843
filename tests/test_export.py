"""Export: ONNX parity with torch, int8 quantization, verified bundles and atomic failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from opsloop.bundle import load_bundle, onnx_session, run_onnx
from opsloop.config import DataConfig
from opsloop.data import load_split
from opsloop.errors import DataError, ExportError
from opsloop.export import ExportResult, export_bundle
from opsloop.model import load_classifier


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_onnx_matches_torch_at_batch_sizes(
    bundle: ExportResult, trained: tuple[Path, DataConfig], batch_size: int
) -> None:
    checkpoint, data = trained
    net = load_classifier(checkpoint).net
    images = load_split(Path(data.processed_dir) / data.name, "test").images[:batch_size]
    with torch.inference_mode():
        expected = net(torch.from_numpy(images.astype(np.float32))).numpy()
    outputs = run_onnx(onnx_session(bundle.path / "model.onnx"), images)
    assert outputs["logits"].shape == (batch_size, 10)
    assert np.abs(outputs["logits"] - expected).max() <= 1e-4
    assert np.array_equal(outputs["logits"].argmax(1), expected.argmax(1))
    assert np.allclose(outputs["probabilities"].sum(1), 1.0, atol=1e-5)
    assert outputs["embedding"].shape == (batch_size, 32)


def test_bundle_json_has_the_contract(bundle: ExportResult) -> None:
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    assert manifest["model_name"] == "digits"
    assert manifest["model_version"] == "3"
    assert manifest["input"] == {"name": "pixels", "shape": [-1, 1, 8, 8], "dtype": "float32"}
    assert set(manifest["outputs"]) == {"probabilities", "embedding", "logits"}
    assert manifest["preprocessing"]["pixel_max"] == 16.0
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["lineage"]["run_id"] == "abc123"
    assert len(manifest["lineage"]["dataset_hash"]) == 64
    assert manifest["metrics"] == {"test/acc": 0.97}
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.int8.onnx",
        "reference.npz",
        "estimator.npz",
        "MODEL_CARD.md",
    }
    assert bundle.parity_max_abs_diff <= 1e-4


def test_quantized_bundle_runs_and_reports_its_delta(bundle: ExportResult) -> None:
    report = bundle.quantization
    assert report is not None
    assert report["int8_bytes"] < report["fp32_bytes"]
    assert report["accuracy_delta"] == pytest.approx(
        report["int8_accuracy"] - report["fp32_accuracy"]
    )
    loaded = load_bundle(bundle.path)
    assert loaded.model_path.name == "model.int8.onnx"
    reference = loaded.load_reference()
    int8 = run_onnx(onnx_session(loaded.model_path), reference["images"])["probabilities"]
    fp32 = run_onnx(onnx_session(bundle.path / "model.onnx"), reference["images"])["probabilities"]
    labels = reference["labels"]
    assert float((int8.argmax(1) == labels).mean()) > 0.5  # far above chance (0.1)
    agreement = float((int8.argmax(1) == fp32.argmax(1)).mean())
    assert agreement > 0.9


def test_reference_data_matches_the_served_model(bundle: ExportResult) -> None:
    reference = load_bundle(bundle.path).load_reference()
    assert reference["images"].dtype == np.uint8
    assert reference["embeddings"].shape == (len(reference["labels"]), 32)
    assert reference["probabilities"].shape == (len(reference["labels"]), 10)


def test_model_card_describes_the_model(bundle: ExportResult) -> None:
    card = (bundle.path / "MODEL_CARD.md").read_text()
    for heading in ("Intended use", "Data", "Metrics", "Per-class", "Limitations", "Lineage"):
        assert f"## {heading}" in card or f"### {heading}" in card
    assert "deadbeef" in card
    assert "Quantization" in card


def test_failed_parity_writes_nothing_and_keeps_the_old_bundle(
    trained: tuple[Path, DataConfig], tmp_path: Path
) -> None:
    checkpoint, data = trained
    out = tmp_path / "bundle"
    export_bundle(checkpoint, data, out, model_name="digits")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"parity check failed.*nothing was written"):
        export_bundle(checkpoint, data, out, model_name="digits", parity_tolerance=0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_dataset_mismatch_is_named(trained: tuple[Path, DataConfig], tmp_path: Path) -> None:
    checkpoint, data = trained
    other = DataConfig(**{**data.__dict__, "processed_dir": str(tmp_path), "name": "digits"})
    shutil.copytree(Path(data.processed_dir) / "digits", tmp_path / "digits")
    manifest_path = tmp_path / "digits" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["class_names"] = [*manifest["class_names"][:9], "nine"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"has classes \[.*'9'\], but dataset .* has \[.*'nine'\]"):
        export_bundle(checkpoint, other, tmp_path / "out", model_name="digits")
    assert not (tmp_path / "out").exists()
