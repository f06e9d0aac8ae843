"""The predict step: a verified bundle in an ONNX Runtime session, without HTTP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from opsloop.bundle import BUNDLE_JSON, MODEL_FILE
from opsloop.config import DataConfig
from opsloop.data import dataset_dir, load_split
from opsloop.errors import BundleError
from opsloop.serve.runtime import SessionTuning, load_model
from tests.serve.onnx_bundles import expected_outputs, weights_of, write_bundle

if TYPE_CHECKING:
    from opsloop.export import ExportResult


def test_loads_a_bundle_with_its_signature(tiny_bundle: Path) -> None:
    model = load_model(tiny_bundle)
    signature = model.signature
    assert (signature.name, signature.version) == ("digits", "1")
    assert signature.input_name == "pixels"
    assert signature.item_shape == (1, 8, 8)
    assert signature.class_names == tuple(str(i) for i in range(10))
    assert signature.embedding_size == 16


def test_predicts_what_the_graph_computes(
    tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    probabilities, embedding = load_model(tiny_bundle).predict(pixels)
    expected_probabilities, expected_embedding = expected_outputs(weights_of(0), pixels)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
    np.testing.assert_allclose(embedding, expected_embedding, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_batched_equals_one_at_a_time(tiny_bundle: Path, pixels: npt.NDArray[np.float32]) -> None:
    model = load_model(tiny_bundle)
    batched = model.predict(pixels)[0]
    single = np.concatenate([model.predict(pixels[i : i + 1])[0] for i in range(len(pixels))])
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_warm_up_runs_the_batch_sizes_used(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(tiny_bundle)
    real_predict = model.predict
    rows_seen: list[int] = []

    def recording_predict(
        pixels: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        rows_seen.append(len(pixels))
        return real_predict(pixels)

    monkeypatch.setattr(model, "predict", recording_predict)
    seconds = model.warm(max_batch_size=8)
    assert rows_seen == [1, 4, 8] + [8] * 5  # every size once, then the largest timed
    assert 0 < seconds < 1


def test_a_bundle_without_a_version_is_named_by_its_hash(tmp_path: Path) -> None:
    model = load_model(write_bundle(tmp_path / "b", version=None))
    assert model.version.startswith("sha-")
    assert len(model.version) == len("sha-") + 12


def test_session_is_tuned(tiny_bundle: Path) -> None:
    model = load_model(tiny_bundle, SessionTuning(intra_op_threads=2, inter_op_threads=1))
    options = model.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1


def test_a_tampered_model_fails_its_checksum(tiny_bundle: Path) -> None:
    (tiny_bundle / MODEL_FILE).write_bytes(b"not the model")
    with pytest.raises(BundleError, match=r"model\.onnx fails its checksum"):
        load_model(tiny_bundle)


def test_a_missing_bundle_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist; create it with `opsloop export`"):
        load_model(tmp_path / "nowhere")


def test_a_manifest_without_the_embedding_output_is_refused(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / BUNDLE_JSON).read_text())
    del manifest["outputs"]["embedding"]
    (tiny_bundle / BUNDLE_JSON).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="needs a dynamic-batch input and outputs"):
        load_model(tiny_bundle)


def test_a_graph_onnx_runtime_cannot_load_is_a_bundle_error(tiny_bundle: Path) -> None:
    garbage = b"\x08\x07garbage that is not a protobuf model"
    (tiny_bundle / MODEL_FILE).write_bytes(garbage)
    manifest = json.loads((tiny_bundle / BUNDLE_JSON).read_text())
    manifest["files"][MODEL_FILE] = hashlib.sha256(garbage).hexdigest()
    (tiny_bundle / BUNDLE_JSON).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        load_model(tiny_bundle)


def test_a_manifest_that_misnames_the_graph_input_is_refused(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / BUNDLE_JSON).read_text())
    manifest["input"]["name"] = "image"
    (tiny_bundle / BUNDLE_JSON).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"not what .*bundle\.json declares"):
        load_model(tiny_bundle)


@pytest.mark.slow
def test_serves_a_bundle_exported_from_a_trained_model(
    bundle: ExportResult, trained: tuple[Path, DataConfig]
) -> None:
    """The real export (torch -> ONNX, int8) loads and classifies held-out digits well."""
    test = load_split(dataset_dir(trained[1]), "test")
    model = load_model(bundle.path)
    assert model.signature.version == "3"
    assert model.signature.item_shape == tuple(bundle.manifest.input.shape[1:])
    probabilities, _ = model.predict(test.images.astype(np.float32))
    accuracy = (probabilities.argmax(axis=1) == test.labels).mean()
    assert accuracy > 0.5  # far above chance (0.1) for the briefly trained test model
    # ...and what the export measured with the same engine (int8 scales depend on the batch).
    assert bundle.quantization is not None
    assert accuracy == pytest.approx(bundle.quantization["int8_accuracy"], abs=0.01)
