"""The model bundle: the contract between training and serving (torch-free).

A bundle is a directory with `model.onnx`, `bundle.json` (what the model takes and returns, its
classes, lineage, metrics and a SHA-256 of every other file), reference data for drift
monitoring (`reference.npz`) and a generated `MODEL_CARD.md`. The serving side needs the bundle
and nothing else; `load_bundle` verifies every checksum before anything uses the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opsloop.atomic import sha256_file
from opsloop.errors import BundleError

BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.onnx"
QUANTIZED_MODEL_FILE = "model.int8.onnx"
REFERENCE_FILE = "reference.npz"
MODEL_CARD = "MODEL_CARD.md"
FORMAT_VERSION = 1
# The graph's tensor names. Export writes them into bundle.json; readers take the input's name
# from there (`manifest.input.name`), so a bundle with another input name still serves.
INPUT_NAME = "pixels"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
LOGITS = "logits"
OUTPUT_NAMES = (PROBABILITIES, EMBEDDING, LOGITS)
ONNX_BATCH = 256
# The prediction log keeps each embedding as its coordinates on the reference's leading
# principal components (`LogBasis`, stored in reference.npz): what drift detection uses, in a
# few bytes instead of the whole vector.
LOG_BASIS_SIZE = 8
LOG_BASIS_ARRAYS = ("log_basis_mean", "log_basis", "log_basis_variance")


class TensorSpec(BaseModel):
    """One named tensor of the ONNX graph; -1 marks the dynamic batch axis."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    dtype: str = "float32"


class Preprocessing(BaseModel):
    """How to map an image file onto the model input: size, channels and pixel scale.

    Normalisation (mean/std) happens inside the graph; it is recorded here for the model card.
    """

    model_config = ConfigDict(extra="forbid")

    height: int
    width: int
    channels: int
    pixel_max: float
    mean: list[float]
    std: list[float]
    resize: str = "bilinear"
    normalisation: str = "in-graph"


class Lineage(BaseModel):
    """Where the model came from: code, data, config and the training run."""

    model_config = ConfigDict(extra="allow")

    git_commit: str = "unknown"
    git_dirty: bool | None = None
    dataset_name: str = "unknown"
    dataset_hash: str = "unknown"
    config_hash: str = "unknown"
    run_id: str | None = None
    seed: int | None = None


class BundleManifest(BaseModel):
    """The content of `bundle.json`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    model_name: str
    model_version: str | None = None
    created_at: str
    model_file: str = MODEL_FILE
    input: TensorSpec
    outputs: dict[str, TensorSpec]
    preprocessing: Preprocessing
    class_names: list[str]
    lineage: Lineage = Field(default_factory=Lineage)
    metrics: dict[str, float] = Field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    opsloop_version: str
    files: dict[str, str] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class LogBasis:
    """The leading principal components of the reference embeddings, and their variance shares.

    `project` maps embeddings (N, D) to their (N, k) coordinates, k <= `LOG_BASIS_SIZE`; the
    server logs those, the monitor compares them with the reference's.
    """

    mean: npt.NDArray[np.float32]  # (D,)
    components: npt.NDArray[np.float32]  # (k, D), orthonormal rows, largest variance first
    variance: npt.NDArray[np.float64]  # (k,) each component's share of the total variance

    @classmethod
    def fit(cls, embeddings: npt.NDArray[Any]) -> LogBasis | None:
        """PCA of `embeddings`; None when they are already no wider than the basis would be."""
        if embeddings.ndim != 2 or embeddings.shape[1] <= LOG_BASIS_SIZE:
            return None
        data = embeddings.astype(np.float64)
        mean = data.mean(axis=0)
        _, singular, vt = np.linalg.svd(data - mean, full_matrices=False)
        variance = singular**2
        total = variance.sum()
        share = variance / total if total > 0 else np.full_like(variance, 1.0 / len(variance))
        keep = min(LOG_BASIS_SIZE, len(share))
        return cls(
            mean=mean.astype(np.float32),
            components=vt[:keep].astype(np.float32),
            variance=share[:keep],
        )

    @property
    def width(self) -> int:
        """How many coordinates `project` gives."""
        return int(self.components.shape[0])

    def project(self, embeddings: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """(N, D) embeddings as (N, k) coordinates on the basis."""
        return np.asarray((embeddings - self.mean) @ self.components.T, dtype=np.float32)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """For `np.savez`, under `LOG_BASIS_ARRAYS`' names."""
        return dict(zip(LOG_BASIS_ARRAYS, (self.mean, self.components, self.variance), strict=True))


class Bundle:
    """A verified bundle on disk: its manifest and the paths of its files."""

    def __init__(self, path: Path, manifest: BundleManifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def reference_path(self) -> Path:
        return self.path / REFERENCE_FILE

    def load_reference(self) -> dict[str, npt.NDArray[Any]]:
        """The drift reference arrays (images, embeddings, probabilities, labels)."""
        if REFERENCE_FILE not in self.manifest.files:
            raise BundleError(
                f"bundle {self.path} has no reference data; re-export it with `opsloop export`"
            )
        with np.load(self.reference_path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    def load_log_basis(self) -> LogBasis | None:
        """The embedding basis of the prediction log; None for bundles exported without one."""
        if REFERENCE_FILE not in self.manifest.files:
            return None
        return read_log_basis(self.reference_path)


def read_log_basis(reference: Path) -> LogBasis | None:
    """The `LogBasis` saved in a reference file, if it holds one (only its arrays are read)."""
    with np.load(reference, allow_pickle=False) as archive:
        if not all(name in archive.files for name in LOG_BASIS_ARRAYS):
            return None
        mean, components, variance = (archive[name] for name in LOG_BASIS_ARRAYS)
    return LogBasis(mean, components, variance)


def load_bundle(path: str | Path) -> Bundle:
    """Read `bundle.json` and verify every file it lists; any problem is a one-line BundleError."""
    directory = Path(path)
    manifest = read_bundle_manifest(directory)
    if manifest.model_file not in manifest.files:
        raise BundleError(f"{directory / BUNDLE_JSON} lists no checksum for {manifest.model_file}")
    for name, expected in manifest.files.items():
        verify_file(directory / name, expected)
    return Bundle(directory, manifest)


def read_bundle_manifest(directory: Path) -> BundleManifest:
    """Parse and validate `bundle.json` without checking the other files."""
    manifest_path = directory / BUNDLE_JSON
    if not directory.is_dir():
        raise BundleError(
            f"bundle directory {directory} does not exist; create it with `opsloop export`"
        )
    if not manifest_path.is_file():
        raise BundleError(f"bundle {directory} has no {BUNDLE_JSON}; re-export it")
    try:
        return BundleManifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BundleError(
            f"{manifest_path} is invalid at '{where}': {first['msg']}; re-export the bundle"
        ) from exc


def verify_file(path: Path, expected_sha256: str) -> None:
    """Fail unless `path` exists with the recorded checksum."""
    if not path.is_file():
        raise BundleError(f"bundle file {path} is missing; re-export the bundle")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise BundleError(
            f"bundle file {path} fails its checksum (expected {expected_sha256[:12]}…, got "
            f"{actual[:12]}…): it was changed or truncated; re-export the bundle"
        )


def onnx_session(
    model: Path | bytes, *, intra_op_threads: int = 0, inter_op_threads: int = 0
) -> Any:
    """An ONNX Runtime CPU session with full graph optimisation (0 threads: ORT decides).

    `model` is a file or its bytes (the server hands over exactly the bytes it checksummed).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3  # errors only: its warnings are noise on every load
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def input_name(session: Any) -> str:
    """The name of a session's single input (the bundle's `input.name`)."""
    return str(session.get_inputs()[0].name)


def run_onnx(session: Any, images: npt.NDArray[Any]) -> dict[str, npt.NDArray[np.float32]]:
    """Every output the session has for `images`, by name, computed in batches."""
    feed = input_name(session)
    names = [node.name for node in session.get_outputs()]
    chunks: dict[str, list[npt.NDArray[np.float32]]] = {name: [] for name in names}
    for start in range(0, len(images), ONNX_BATCH):
        batch = images[start : start + ONNX_BATCH].astype(np.float32)
        for name, value in zip(names, session.run(names, {feed: batch}), strict=True):
            chunks[name].append(value)
    return {name: np.concatenate(values) for name, values in chunks.items()}
