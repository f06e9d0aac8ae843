"""Export a trained checkpoint to a verified model bundle (ONNX + bundle.json + reference data).

The graph takes raw pixels on the dataset's scale (normalisation is inside it), has a dynamic
batch axis, and returns class probabilities, the penultimate-layer embedding (for drift
monitoring without torch) and the logits. The export fails loudly, writing nothing, unless ONNX
Runtime matches the torch model on held-out data. Optionally adds a dynamic int8 model.

    opsloop export --checkpoint outputs/.../best.ckpt --out bundles/digits

Why one file of ~450 lines: one stage whose steps (ONNX export, parity check, quantization,
reference sample, manifest, model card) run in order inside one staged directory.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from opsloop import __version__
from opsloop.atomic import sha256_file, staged_directory
from opsloop.bundle import (
    BUNDLE_JSON,
    EMBEDDING,
    INPUT_NAME,
    MODEL_CARD,
    MODEL_FILE,
    ONNX_BATCH,
    OUTPUT_NAMES,
    PROBABILITIES,
    QUANTIZED_MODEL_FILE,
    REFERENCE_FILE,
    BundleManifest,
    Lineage,
    LogBasis,
    Preprocessing,
    TensorSpec,
    onnx_session,
    read_log_basis,
    run_onnx,
)
from opsloop.config import DataConfig, OpsloopConfig
from opsloop.data import Manifest, dataset_dir, load_split, read_manifest
from opsloop.errors import BundleError, ExportError
from opsloop.model import ConvNet, ModelSpec, check_checkpoint_fits, load_classifier

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
# The training run's tags a bundle carries as its lineage (plus run_id, git_dirty and seed).
LINEAGE_TAGS = ("git_commit", "dataset_name", "dataset_hash", "config_hash")


@dataclass(frozen=True)
class ExportResult:
    """Where the bundle went, and what the checks measured."""

    path: Path
    manifest: BundleManifest
    parity_max_abs_diff: float
    parity_samples: int
    quantization: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)


def lineage_from_run(tags: Mapping[str, str], run_id: str) -> dict[str, Any]:
    """A bundle's lineage from its training run's tags: code, data, config, seed and the run.

    The one rule for what a bundle records, whether `opsloop pipeline` or `opsloop export
    --run-id` wrote it; typed as `bundle.Lineage` declares (a bool for git_dirty, an int seed).
    """
    lineage: dict[str, Any] = {key: tags[key] for key in LINEAGE_TAGS if key in tags}
    lineage["run_id"] = run_id
    if "git_dirty" in tags:
        lineage["git_dirty"] = tags["git_dirty"] == "true"
    if tags.get("seed", "").isdigit():
        lineage["seed"] = int(tags["seed"])
    return lineage


def export_run(
    run_id: str,
    cfg: OpsloopConfig,
    out_dir: Path,
    *,
    model_version: str | None = None,
    metrics: Mapping[str, float] | None = None,
    quantize: bool = False,
) -> ExportResult:
    """Export a tracked run's best checkpoint, with the run's lineage, into `out_dir`."""
    import tempfile

    from opsloop.tracking import checkpoint_for_run, resolve_tracking_uri, run_lineage

    uri = resolve_tracking_uri(cfg.logger, Path(cfg.workspace))
    with tempfile.TemporaryDirectory(prefix="opsloop-export-") as scratch:
        checkpoint = checkpoint_for_run(run_id, uri, Path(scratch))
        return export_bundle(
            checkpoint,
            cfg.data,
            out_dir,
            model_name=cfg.registry.model_name,
            model_version=model_version,
            lineage=lineage_from_run(run_lineage(run_id, uri), run_id),
            metrics=metrics,
            quantize=quantize,
        )


def export_bundle(
    checkpoint: Path,
    data: DataConfig,
    out_dir: Path,
    *,
    model_name: str,
    model_version: str | None = None,
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    quantize: bool = False,
    reference_size: int = 2000,
    parity_tolerance: float = PARITY_TOLERANCE,
) -> ExportResult:
    """Export `checkpoint` into the bundle directory `out_dir`, atomically and verified."""
    classifier = load_classifier(checkpoint)
    hparams = dict(classifier.hparams)
    dataset = dataset_dir(data)
    manifest = read_manifest(dataset)
    check_checkpoint_fits(ModelSpec.from_hparams(hparams), manifest, checkpoint, dataset)
    test = load_split(dataset, "test")
    reference = load_split(dataset, "val")
    try:
        with staged_directory(out_dir) as staging:
            export_onnx(classifier.net, hparams["image_shape"], staging / MODEL_FILE)
            max_diff = check_parity(
                classifier.net, staging / MODEL_FILE, test.images, parity_tolerance
            )
            quantization = quantize_model(staging, test.images, test.labels) if quantize else None
            served = QUANTIZED_MODEL_FILE if quantize else MODEL_FILE
            write_reference(
                staging / served, reference.images, reference.labels, reference_size, staging
            )
            write_estimator(
                staging / served,
                reference.images,
                reference.labels,
                float(hparams["pixel_max"]),
                staging,
            )
            bundle_manifest = build_bundle_manifest(
                hparams,
                model_name=model_name,
                model_version=model_version,
                model_file=served,
                lineage={"dataset_name": manifest.name, "dataset_hash": manifest.content_hash}
                | dict(lineage or {}),
                metrics=dict(metrics or {}),
                quantization=quantization,
                embedding_size=int(classifier.net.head.in_features),
            )
            write_model_card(staging / MODEL_CARD, bundle_manifest, manifest, evaluation)
            bundle_manifest = finalize_manifest(staging, bundle_manifest)
    except OSError as exc:
        raise ExportError(
            f"cannot write the bundle to {out_dir}: {exc.strerror or exc}; choose a writable --out"
        ) from exc
    logger.info("exported %s (parity max |Δlogit| %.2e)", out_dir, max_diff)
    return ExportResult(
        path=out_dir,
        manifest=bundle_manifest,
        parity_max_abs_diff=max_diff,
        parity_samples=len(test.labels),
        quantization=quantization,
        files=[*sorted(bundle_manifest.files), BUNDLE_JSON],
    )


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's and quantizer's progress chatter (they log at INFO and WARNING)."""
    # onnxruntime.quantization logs its progress on the root logger, hence "" in the list.
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir", "onnxscript", "")
    noisy = [logging.getLogger(name) for name in names]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)


class ExportedModel(torch.nn.Module):
    """The graph that becomes ONNX: raw pixels in; probabilities, embedding and logits out."""

    def __init__(self, net: ConvNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, embedding = self.net.forward_with_embedding(pixels)
        return torch.softmax(logits, dim=-1), embedding, logits


def export_onnx(net: Any, image_shape: Sequence[int], path: Path) -> None:
    """Write a single-file ONNX graph with a dynamic batch axis on every input and output."""
    module = ExportedModel(net).eval()
    example = torch.zeros(2, *image_shape, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixels": {0: batch}},
            verbose=False,
        )
        if program is None:
            raise ExportError("torch.onnx.export returned no program; upgrade torch and onnxscript")
        program.save(str(path), external_data=False)


def torch_logits(net: Any, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), ONNX_BATCH):
            batch = torch.from_numpy(images[start : start + ONNX_BATCH].astype(np.float32))
            outputs.append(net(batch).numpy())
    return np.concatenate(outputs)


def check_parity(net: Any, model_path: Path, images: npt.NDArray[Any], tolerance: float) -> float:
    """ONNX Runtime must reproduce torch's logits (max |Δ| <= tolerance) and every argmax."""
    expected = torch_logits(net, images)
    actual = run_onnx(onnx_session(model_path), images)["logits"]
    max_diff = float(np.abs(actual - expected).max())
    mismatched = int((actual.argmax(1) != expected.argmax(1)).sum())
    if max_diff > tolerance or mismatched:
        raise ExportError(
            f"ONNX parity check failed on {len(images)} held-out images: max |Δlogit| = "
            f"{max_diff:.2e} (tolerance {tolerance:.0e}), {mismatched} different predictions; "
            "nothing was written — check the torch/onnxruntime versions or the model's ops"
        )
    return max_diff


def quantize_model(
    staging: Path, images: npt.NDArray[Any], labels: npt.NDArray[np.int64]
) -> dict[str, Any]:
    """Dynamic int8 quantization of the weights, with its accuracy delta and size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = staging / MODEL_FILE, staging / QUANTIZED_MODEL_FILE
    with quiet_exporter():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    accuracy = {
        path.name: float(
            (run_onnx(onnx_session(path), images)["probabilities"].argmax(1) == labels).mean()
        )
        for path in (source, target)
    }
    report = {
        "method": "onnxruntime dynamic int8 (weights)",
        "fp32_accuracy": accuracy[MODEL_FILE],
        "int8_accuracy": accuracy[QUANTIZED_MODEL_FILE],
        "accuracy_delta": accuracy[QUANTIZED_MODEL_FILE] - accuracy[MODEL_FILE],
        "fp32_bytes": source.stat().st_size,
        "int8_bytes": target.stat().st_size,
    }
    logger.info(
        "int8: accuracy %.4f -> %.4f, size %d -> %d bytes",
        report["fp32_accuracy"],
        report["int8_accuracy"],
        report["fp32_bytes"],
        report["int8_bytes"],
    )
    return report


def write_estimator(
    model_path: Path,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.int64],
    pixel_max: float,
    staging: Path,
) -> None:
    """The label-free accuracy estimator of the served file, fitted on the validation split.

    See `opsloop.monitor.estimate`: the monitor reads it to estimate accuracy on windows that
    no label has reached. Fitted with ONNX Runtime, the engine that serves the model.
    """
    from opsloop.monitor.estimate import ESTIMATOR_FILE, fit_estimator

    session = onnx_session(model_path)

    def predict(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        outputs = run_onnx(session, batch)
        return outputs[PROBABILITIES], outputs[EMBEDDING]

    # In the log's embedding basis: the monitor hands it embeddings as the log keeps them.
    basis = read_log_basis(staging / REFERENCE_FILE)
    estimator = fit_estimator(predict, images, labels, pixel_max, seed=0, basis=basis)
    estimator.save(staging / ESTIMATOR_FILE)


def write_reference(
    model_path: Path,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    size: int,
    staging: Path,
) -> None:
    """A reference sample for drift monitoring: raw images with the served model's outputs.

    The outputs come from ONNX Runtime running the served file, the same engine the server uses,
    so reference and live embeddings are directly comparable.
    """
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(len(labels))[:size])
    sample = images[pick]
    outputs = run_onnx(onnx_session(model_path), sample)
    basis = LogBasis.fit(outputs["embedding"])
    arrays: dict[str, npt.NDArray[Any]] = {
        "images": sample,
        "labels": labels[pick],
        "probabilities": outputs["probabilities"],
        "embeddings": outputs["embedding"],
    }
    if basis is not None:
        arrays |= basis.arrays()
    # numpy's stubs cannot tell these names from its `allow_pickle` flag.
    np.savez(staging / REFERENCE_FILE, **arrays)  # type: ignore[arg-type]


def build_bundle_manifest(
    hparams: Mapping[str, Any],
    *,
    model_name: str,
    model_version: str | None,
    model_file: str,
    lineage: dict[str, Any],
    metrics: dict[str, float],
    quantization: dict[str, Any] | None,
    embedding_size: int,
) -> BundleManifest:
    channels, height, width = (int(d) for d in hparams["image_shape"])
    num_classes = len(hparams["class_names"])
    return BundleManifest(
        model_name=model_name,
        model_version=model_version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        model_file=model_file,
        input=TensorSpec(name=INPUT_NAME, shape=[-1, channels, height, width]),
        outputs={
            "probabilities": TensorSpec(name="probabilities", shape=[-1, num_classes]),
            "embedding": TensorSpec(name="embedding", shape=[-1, embedding_size]),
            "logits": TensorSpec(name="logits", shape=[-1, num_classes]),
        },
        preprocessing=Preprocessing(
            height=height,
            width=width,
            channels=channels,
            pixel_max=float(hparams["pixel_max"]),
            mean=list(hparams["pixel_mean"]),
            std=list(hparams["pixel_std"]),
        ),
        class_names=list(hparams["class_names"]),
        lineage=Lineage(**lineage),
        metrics=metrics,
        quantization=quantization,
        opsloop_version=__version__,
    )


def finalize_manifest(staging: Path, manifest: BundleManifest) -> BundleManifest:
    """Record every file's SHA-256 and write bundle.json last."""
    files = {
        path.name: sha256_file(path)
        for path in sorted(staging.iterdir())
        if path.is_file() and path.name != BUNDLE_JSON
    }
    final = manifest.model_copy(update={"files": files})
    (staging / BUNDLE_JSON).write_text(final.model_dump_json(indent=2) + "\n")
    return final


def write_model_card(
    path: Path,
    bundle: BundleManifest,
    dataset: Manifest,
    evaluation: Mapping[str, Any] | None,
) -> None:
    """A human-readable model card generated from the bundle's own metadata."""
    path.write_text(render_model_card(bundle, dataset, evaluation))


def render_model_card(
    bundle: BundleManifest, dataset: Manifest, evaluation: Mapping[str, Any] | None
) -> str:
    prep = bundle.preprocessing
    lines = [
        f"# Model card: {bundle.model_name}"
        + (f" v{bundle.model_version}" if bundle.model_version else ""),
        "",
        "## Intended use",
        "",
        f"Classifies {prep.channels}-channel {prep.height}x{prep.width} images into "
        f"{bundle.num_classes} classes ({', '.join(bundle.class_names)}). Inputs are raw pixels "
        f"on a 0-{prep.pixel_max:g} scale; normalisation is inside the graph. Not intended for "
        "images unlike the training data (other domains, sizes or scales): monitor drift.",
        "",
        "## Data",
        "",
        f"- dataset: `{dataset.name}` (content hash `{dataset.content_hash[:16]}`), source "
        f"`{dataset.source}`",
        "- splits: " + ", ".join(f"{k}={v}" for k, v in dataset.counts.items()),
        f"- pixel mean/std (train): {dataset.pixel_mean} / {dataset.pixel_std}",
        "",
        "## Metrics",
        "",
    ]
    lines += [f"- {key}: {value:.4f}" for key, value in sorted(bundle.metrics.items())] or [
        "- none recorded"
    ]
    if evaluation:
        lines += _table_section("Per-class", evaluation.get("per_class"))
        lines += _table_section(
            "Robustness (accuracy under corruptions)", evaluation.get("robustness")
        )
    if bundle.quantization:
        q = bundle.quantization
        lines += [
            "",
            "## Quantization",
            "",
            f"{q['method']}: accuracy {q['fp32_accuracy']:.4f} -> {q['int8_accuracy']:.4f} "
            f"(delta {q['accuracy_delta']:+.4f}), "
            f"size {q['fp32_bytes']} -> {q['int8_bytes']} bytes",
        ]
    lineage = bundle.lineage.model_dump()
    lines += [
        "",
        "## Limitations",
        "",
        "- Trained on a small, clean dataset: accuracy drops under noise, blur, rotation and "
        "occlusion (see the robustness table when evaluation was run).",
        "- Probabilities may be over-confident outside the training distribution.",
        "",
        "## Lineage",
        "",
        *[f"- {key}: `{value}`" for key, value in lineage.items()],
        f"- opsloop: `{bundle.opsloop_version}`, created `{bundle.created_at}`",
        "",
    ]
    return "\n".join(lines)


def _table_section(title: str, rows: Any) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    table = ["", f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        table.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return table


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


__all__ = ["BundleError", "ExportResult", "export_bundle"]
