"""Tiny, real model bundles for the serving tests, built in milliseconds without torch.

`write_bundle` writes a two-layer ONNX classifier (flatten -> dense -> relu = embedding -> dense ->
softmax) with seeded random weights, and a `bundle.json` with every file's checksum — the same
contract `opsloop export` fulfils, so the server cannot tell the difference. Different seeds give
different models, which the reload tests use as "versions".
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from opsloop.bundle import (
    BUNDLE_JSON,
    MODEL_FILE,
    REFERENCE_FILE,
    BundleManifest,
    LogBasis,
    Preprocessing,
    TensorSpec,
)

EMBEDDING = 16


def build_model(
    item_shape: tuple[int, ...], classes: int, seed: int
) -> tuple[bytes, dict[str, npt.NDArray[np.float32]]]:
    """The ONNX graph's bytes and its weights (for computing expected outputs in numpy)."""
    rng = np.random.default_rng(seed)
    features = math.prod(item_shape)
    weights = {
        "w1": (rng.normal(size=(features, EMBEDDING)) / np.sqrt(features)).astype(np.float32),
        "b1": rng.normal(size=EMBEDDING).astype(np.float32) * 0.1,
        "w2": rng.normal(size=(EMBEDDING, classes)).astype(np.float32),
        "b2": rng.normal(size=classes).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w2"], ["l"]),
        helper.make_node("Add", ["l", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *item_shape])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), weights


def expected_outputs(
    weights: dict[str, npt.NDArray[np.float32]], pixels: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The graph's probabilities and embedding, computed in numpy."""
    flat = pixels.reshape(len(pixels), -1).astype(np.float64)
    embedding = np.maximum(flat @ weights["w1"] + weights["b1"], 0)
    logits = embedding @ weights["w2"] + weights["b2"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32), embedding.astype(np.float32)


def write_bundle(
    directory: Path,
    *,
    version: str | None = "1",
    seed: int = 0,
    name: str = "digits",
    item_shape: tuple[int, int, int] = (1, 8, 8),
    pixel_max: float = 16.0,
    log_basis: bool = False,
) -> Path:
    """Write (or replace) a bundle directory; returns it.

    With `log_basis` it carries a reference file holding only the prediction log's embedding
    basis, fitted on the model's embeddings of random images.
    """
    channels, height, width = item_shape
    classes = 10
    model_bytes, weights = build_model(item_shape, classes, seed)
    staging = directory.with_name(f".{directory.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / MODEL_FILE).write_bytes(model_bytes)
    manifest = BundleManifest(
        model_name=name,
        model_version=version,
        created_at="2026-01-01T00:00:00+00:00",
        input=TensorSpec(name="pixels", shape=[-1, *item_shape]),
        outputs={
            "probabilities": TensorSpec(name="probabilities", shape=[-1, classes]),
            "embedding": TensorSpec(name="embedding", shape=[-1, EMBEDDING]),
            "logits": TensorSpec(name="logits", shape=[-1, classes]),
        },
        preprocessing=Preprocessing(
            height=height,
            width=width,
            channels=channels,
            pixel_max=pixel_max,
            mean=[pixel_max / 4] * channels,
            std=[pixel_max / 3] * channels,
        ),
        class_names=[str(i) for i in range(classes)],
        opsloop_version="test",
        files={MODEL_FILE: hashlib.sha256(model_bytes).hexdigest()},
    )
    if log_basis:
        images = np.random.default_rng(seed).random((200, *item_shape)) * pixel_max
        basis = LogBasis.fit(expected_outputs(weights, images.astype(np.float32))[1])
        assert basis is not None
        np.savez(staging / REFERENCE_FILE, **basis.arrays())
        checksum = hashlib.sha256((staging / REFERENCE_FILE).read_bytes()).hexdigest()
        manifest.files[REFERENCE_FILE] = checksum
    (staging / BUNDLE_JSON).write_text(manifest.model_dump_json(indent=2))
    # Replace atomically, as `opsloop export` does, so a polling server never sees half a bundle.
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.retired")
        shutil.rmtree(retired, ignore_errors=True)
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired)
    else:
        staging.rename(directory)
    return directory


def weights_of(
    seed: int, item_shape: tuple[int, ...] = (1, 8, 8)
) -> dict[str, npt.NDArray[np.float32]]:
    return build_model(item_shape, 10, seed)[1]
