"""ONNX Runtime in process: a verified bundle -> a tuned inference session (torch-free).

The session runs exactly the bytes whose SHA-256 `bundle.json` records (read once, checked, then
handed to ONNX Runtime), so a bundle replaced mid-load can never be half-served. Graph
optimisation is at its highest level and the thread counts are explicit: with one session per
worker process and one worker per core, one intra-op thread avoids oversubscribing the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from opsloop.bundle import EMBEDDING, PROBABILITIES, Bundle, load_bundle, onnx_session
from opsloop.errors import BundleError, first_line
from opsloop.serve.protocol import ModelSignature

logger = logging.getLogger(__name__)

RUN_OUTPUTS = [PROBABILITIES, EMBEDDING]


@dataclass(frozen=True)
class SessionTuning:
    """ONNX Runtime's CPU knobs; 0 threads lets ONNX Runtime pick (all cores)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1


class OnnxModel:
    """One loaded bundle: its manifest, signature and ONNX Runtime session."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, model_sha256: str) -> None:
        self.bundle = bundle
        self.session = session
        self.model_sha256 = model_sha256
        manifest = bundle.manifest
        self.signature = ModelSignature(
            name=manifest.model_name,
            version=manifest.model_version or f"sha-{model_sha256[:12]}",
            input_name=manifest.input.name,
            item_shape=tuple(manifest.input.shape[1:]),
            class_names=tuple(manifest.class_names),
            embedding_size=manifest.outputs[EMBEDDING].shape[-1],
        )
        self._feed_name = manifest.input.name
        # Embeddings are logged as coordinates on this basis (a few numbers, not the vector).
        self.log_basis = bundle.load_log_basis()

    def loggable_embedding(self, embedding: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """What the prediction log keeps of an embedding: its log-basis coordinates."""
        return embedding if self.log_basis is None else self.log_basis.project(embedding)

    @property
    def version(self) -> str:
        return self.signature.version

    def predict(
        self, pixels: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Probabilities and embeddings for a (rows, C, H, W) float32 batch."""
        probabilities, embedding = self.session.run(RUN_OUTPUTS, {self._feed_name: pixels})
        return probabilities, embedding

    def serve_batch(
        self, pixels: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """What the server's micro-batcher runs: `predict`, plus what the log keeps of the
        embeddings, projected once for the whole batch instead of once per request."""
        probabilities, embedding = self.predict(pixels)
        return probabilities, embedding, self.loggable_embedding(embedding)

    def warm(self, max_batch_size: int) -> float:
        """Run the batch sizes the server will use, so the first requests pay no set-up cost;
        the seconds the largest batch takes once warm (the best of a few runs)."""
        for rows in sorted({1, max(1, max_batch_size // 2), max_batch_size}):
            self.serve_batch(np.zeros((rows, *self.signature.item_shape), dtype=np.float32))
        batch = np.zeros((max_batch_size, *self.signature.item_shape), dtype=np.float32)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            self.serve_batch(batch)
            timings.append(time.perf_counter() - started)
        return min(timings)


def load_model(path: str | Path, tuning: SessionTuning | None = None) -> OnnxModel:
    """Load and verify a bundle directory into an ONNX Runtime session; BundleError if unusable."""
    bundle = load_bundle(path)
    check_signature(bundle)
    model_bytes = bundle.model_path.read_bytes()
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    if sha256 != bundle.manifest.files[bundle.manifest.model_file]:
        raise BundleError(
            f"bundle file {bundle.model_path} changed while loading; retry once the bundle is "
            "fully written"
        )
    try:
        tuning = tuning or SessionTuning()
        session = onnx_session(
            model_bytes,
            intra_op_threads=tuning.intra_op_threads,
            inter_op_threads=tuning.inter_op_threads,
        )
    except Exception as exc:  # ONNX Runtime raises its own untyped errors for a bad graph
        raise BundleError(
            f"ONNX Runtime cannot load {bundle.model_path}: {first_line(exc)}; re-export it"
        ) from exc
    check_session(session, bundle)
    logger.info(
        "loaded %s v%s from %s",
        bundle.manifest.model_name,
        bundle.manifest.model_version or "?",
        bundle.path,
    )
    return OnnxModel(bundle, session, sha256)


def check_signature(bundle: Bundle) -> None:
    """The manifest must declare what the server relies on: a batched input and both outputs."""
    manifest = bundle.manifest
    missing = [name for name in RUN_OUTPUTS if name not in manifest.outputs]
    if missing or len(manifest.input.shape) < 2 or manifest.input.shape[0] != -1:
        raise BundleError(
            f"bundle {bundle.path} needs a dynamic-batch input and outputs {RUN_OUTPUTS} "
            f"(has input shape {manifest.input.shape}, outputs {sorted(manifest.outputs)}); "
            "re-export it with `opsloop export`"
        )


def check_session(session: ort.InferenceSession, bundle: Bundle) -> None:
    """The graph itself must match its manifest's names."""
    inputs = [node.name for node in session.get_inputs()]
    outputs = {node.name for node in session.get_outputs()}
    if inputs != [bundle.manifest.input.name] or not set(RUN_OUTPUTS) <= outputs:
        raise BundleError(
            f"{bundle.model_path} has inputs {inputs} and outputs {sorted(outputs)}, not what "
            f"{bundle.path / 'bundle.json'} declares; re-export the bundle"
        )
