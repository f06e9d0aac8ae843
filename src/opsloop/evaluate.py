"""Evaluate a trained checkpoint on a processed split: metrics, calibration, robustness, plots.

Run `opsloop evaluate --checkpoint PATH` (or `--run-id ID` to evaluate an MLflow run and log the
report back into it), or call `evaluate_model(checkpoint, cfg.data, out_dir=DIR)`. The report in
`out_dir` holds metrics.json, per_class.csv, robustness.md, confusion_matrix.png and
reliability_diagram.png. Imports torch: use it where training code is installed.

Why one file of ~500 lines: one stage, most of it small pure metric functions (confusion,
per-class, calibration, robustness) and the two plots, each tested on its own.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from opsloop import __version__
from opsloop.atomic import replace_atomically
from opsloop.config import DataConfig, LoggerConfig
from opsloop.corruption import CORRUPTIONS, SEVERITIES
from opsloop.data import Manifest, dataset_dir, load_split, read_manifest
from opsloop.errors import DataError
from opsloop.model import ModelSpec, check_checkpoint_fits, load_classifier

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

ECE_BINS = 15
METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
ROBUSTNESS_FILE = "robustness.md"
CONFUSION_FILE = "confusion_matrix.png"
RELIABILITY_FILE = "reliability_diagram.png"
RUN_CHECKPOINT = "checkpoints/best.ckpt"
RUN_ARTIFACT_DIR = "evaluation"
RUN_METRIC_PREFIX = "eval/"

Predictor = Callable[[npt.NDArray[Any]], npt.NDArray[np.int64]]


@dataclass(frozen=True)
class EvalResult:
    """The outcome of `evaluate_model`: what was measured and where the report was written."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    robustness: list[dict[str, Any]]
    files: list[Path]
    out_dir: Path

    @property
    def worst_corruption(self) -> dict[str, Any]:
        """The robustness row with the lowest accuracy."""
        return min(self.robustness, key=lambda row: float(row["accuracy"]))


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width confidence bins: how many predictions fell in each and how often they were right.

    `confidence` and `accuracy` are NaN for empty bins.
    """

    edges: npt.NDArray[np.float64]
    count: npt.NDArray[np.int64]
    confidence: npt.NDArray[np.float64]
    accuracy: npt.NDArray[np.float64]

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence| gap."""
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled]) * self.count[filled]
        return float(gaps.sum() / max(int(self.count.sum()), 1))

    def to_json(self) -> dict[str, Any]:
        return {
            "edges": self.edges.tolist(),
            "count": self.count.tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in self.confidence],
            "accuracy": [None if np.isnan(v) else float(v) for v in self.accuracy],
        }


def evaluate_model(
    checkpoint: Path,
    data: DataConfig,
    *,
    out_dir: Path,
    seed: int = 0,
    split: str = "test",
    checkpoint_ref: str | None = None,
) -> EvalResult:
    """Evaluate `checkpoint` on `split` of the processed dataset `data` and write the report.

    Args:
        checkpoint: a Lightning checkpoint of an `ImageClassifier`, loaded with weights_only.
        data: the dataset to evaluate on; it must match the checkpoint's image shape, classes and
            pixel scale.
        out_dir: where the report files go (created if missing).
        seed: seeds the corruptions, so two runs give identical robustness tables.
        split: `train`, `val` or `test`.
        checkpoint_ref: how metrics.json names the checkpoint (default: its path), e.g. a
            `runs:/<id>/...` URI when it was downloaded from a tracked run.
    """
    classifier = load_classifier(checkpoint)
    spec = ModelSpec.from_hparams(classifier.hparams)
    lineage = checkpoint_lineage(checkpoint)
    path = dataset_dir(data)
    manifest = read_manifest(path)
    check_checkpoint_fits(spec, manifest, checkpoint, path, trained_on=lineage.get("dataset_name"))
    warn_if_other_version(lineage, manifest, checkpoint)
    arrays = load_split(path, split)
    logger.info("evaluating %s on %s/%s (%d images)", checkpoint, path, split, len(arrays.labels))

    def predict(images: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        scores = predict_log_probs(classifier.net, images, batch_size=data.batch_size)
        return np.asarray(scores.argmax(axis=1), dtype=np.int64)

    log_probs = predict_log_probs(classifier.net, arrays.images, batch_size=data.batch_size)
    confusion = confusion_matrix(arrays.labels, log_probs.argmax(axis=1), spec.num_classes)
    per_class = per_class_metrics(confusion, spec.class_names)
    bins = calibration_bins(log_probs, arrays.labels, n_bins=ECE_BINS)
    metrics = summary_metrics(confusion, per_class, bins, log_probs, arrays.labels)
    robustness = robustness_table(
        predict,
        arrays.images,
        arrays.labels,
        pixel_max=spec.pixel_max,
        seed=seed,
        clean_accuracy=metrics["accuracy"],
    )
    metrics |= robustness_summary(robustness, metrics["accuracy"])
    report = {
        "checkpoint": checkpoint_ref or str(checkpoint),
        "dataset": {
            "name": manifest.name,
            "path": str(path),
            "content_hash": manifest.content_hash,
            "split": split,
            "num_samples": len(arrays.labels),
        },
        "trained_on": {
            "name": lineage.get("dataset_name"),
            "content_hash": lineage.get("dataset_hash"),
        },
        "seed": seed,
        "metrics": metrics,
        "per_class": per_class,
        "robustness": robustness,
        "calibration": bins.to_json(),
        "class_names": spec.class_names,
        "confusion_matrix": confusion.tolist(),
        "opsloop_version": __version__,
    }
    files = write_report(Path(out_dir), report, confusion, bins)
    logger.info("wrote the evaluation report to %s", out_dir)
    return EvalResult(metrics, per_class, robustness, files, Path(out_dir))


def evaluate_run(
    run_id: str,
    data: DataConfig,
    tracking: LoggerConfig,
    *,
    workspace: Path,
    out_dir: Path,
    seed: int = 0,
    split: str = "test",
) -> EvalResult:
    """Evaluate a tracked run's best checkpoint, then log the report and metrics into that run.

    The report goes to the run's `evaluation/` artifacts and the metrics get an `eval/` prefix.
    """
    from opsloop.tracking import (
        checkpoint_for_run,
        log_artifacts_to_run,
        log_metrics_to_run,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(tracking, workspace)
    # The download is scratch: the run already stores the checkpoint, and the report directory
    # is logged back whole, so the checkpoint must not land in it.
    with tempfile.TemporaryDirectory(prefix="opsloop-eval-") as scratch:
        checkpoint = checkpoint_for_run(run_id, uri, Path(scratch))
        result = evaluate_model(
            checkpoint,
            data,
            out_dir=out_dir,
            seed=seed,
            split=split,
            checkpoint_ref=f"runs:/{run_id}/{RUN_CHECKPOINT}",
        )
    log_artifacts_to_run(run_id, uri, result.out_dir, RUN_ARTIFACT_DIR)
    log_metrics_to_run(
        run_id, uri, {f"{RUN_METRIC_PREFIX}{key}": value for key, value in result.metrics.items()}
    )
    logger.info("logged the evaluation into run %s", run_id)
    return result


def default_out_dir(workspace: str | Path, output_dir: str, name: str) -> Path:
    """`<workspace>/<output_dir>/eval/<name>`: where a report goes unless told otherwise."""
    return Path(workspace) / output_dir / "eval" / name


def checkpoint_lineage(checkpoint: Path) -> dict[str, str]:
    """The lineage `opsloop train` stores in its checkpoints (empty for other checkpoints)."""
    from opsloop.train import CHECKPOINT_LINEAGE_KEY

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    lineage = saved.get(CHECKPOINT_LINEAGE_KEY) if isinstance(saved, dict) else None
    if not isinstance(lineage, dict):
        return {}
    return {str(key): str(value) for key, value in lineage.items()}


def warn_if_other_version(lineage: dict[str, str], manifest: Manifest, checkpoint: Path) -> None:
    """Evaluating on another version of the training dataset is allowed, but worth a warning."""
    trained_hash = lineage.get("dataset_hash")
    if trained_hash is not None and trained_hash != manifest.content_hash:
        logger.warning(
            "%s was trained on %s %s but is evaluated on %s %s: another version of the data",
            checkpoint,
            lineage.get("dataset_name"),
            trained_hash[:12],
            manifest.name,
            manifest.content_hash[:12],
        )


def predict_log_probs(
    net: torch.nn.Module, images: npt.NDArray[Any], *, batch_size: int
) -> npt.NDArray[np.float64]:
    """Log-softmax scores (N, K) of a network in eval mode for raw-pixel images, in batches."""
    batch_size = max(int(batch_size), 1)
    outputs: list[npt.NDArray[np.float64]] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.asarray(images[start : start + batch_size], np.float32))
            logits = net(batch)
            outputs.append(torch.log_softmax(logits.double(), dim=-1).numpy())
    return np.concatenate(outputs)


def confusion_matrix(
    labels: npt.NDArray[np.integer[Any]],
    predictions: npt.NDArray[np.integer[Any]],
    num_classes: int,
) -> npt.NDArray[np.int64]:
    """Counts (K, K): rows are true classes, columns predicted classes."""
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def per_class_metrics(
    confusion: npt.NDArray[np.int64], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class; 0 where a ratio is undefined (as sklearn)."""
    hits = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return [
        {
            "name": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def calibration_bins(
    log_probs: npt.NDArray[np.float64], labels: npt.NDArray[np.integer[Any]], *, n_bins: int
) -> CalibrationBins:
    """Bin the top-class confidence into `n_bins` equal-width bins over [0, 1].

    A bin holds confidences in [lower, upper); a confidence of exactly 1 goes in the last bin
    (the same convention as torchmetrics' `MulticlassCalibrationError`).
    """
    confidence = np.exp(log_probs.max(axis=1))
    correct = (log_probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins become NaN, on purpose
        mean_confidence = np.bincount(index, confidence, n_bins) / count
        accuracy = np.bincount(index, correct, n_bins) / count
    return CalibrationBins(edges, count, mean_confidence, accuracy)


def negative_log_likelihood(
    log_probs: npt.NDArray[np.float64], labels: npt.NDArray[np.integer[Any]]
) -> float:
    """Mean cross-entropy of the true classes."""
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def summary_metrics(
    confusion: npt.NDArray[np.int64],
    per_class: list[dict[str, Any]],
    bins: CalibrationBins,
    log_probs: npt.NDArray[np.float64],
    labels: npt.NDArray[np.integer[Any]],
) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 (unweighted over all classes), ECE and NLL."""
    return {
        "accuracy": float(np.trace(confusion) / max(int(confusion.sum()), 1)),
        "macro_f1": float(np.mean([row["f1"] for row in per_class])),
        "macro_precision": float(np.mean([row["precision"] for row in per_class])),
        "macro_recall": float(np.mean([row["recall"] for row in per_class])),
        "ece": bins.ece,
        "nll": negative_log_likelihood(log_probs, labels),
    }


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """A generator per (seed, corruption, severity), stable when corruptions are added."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity])


def robustness_table(
    predict: Predictor,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.integer[Any]],
    *,
    pixel_max: float,
    seed: int,
    clean_accuracy: float,
) -> list[dict[str, Any]]:
    """Accuracy under every corruption at every severity, and its change from `clean_accuracy`."""
    rows: list[dict[str, Any]] = []
    for name, corruption in CORRUPTIONS.items():
        for severity in SEVERITIES:
            rng = corruption_rng(seed, name, severity)
            corrupted = corruption(images, severity, pixel_max=pixel_max, rng=rng)
            accuracy = float(np.mean(predict(corrupted) == labels))
            rows.append(
                {
                    "corruption": name,
                    "severity": severity,
                    "parameter": corruption.parameter,
                    "level": corruption.level(severity),
                    "accuracy": accuracy,
                    "delta": accuracy - clean_accuracy,
                }
            )
        logger.info("robustness: %s done", name)
    return rows


def robustness_summary(rows: list[dict[str, Any]], clean_accuracy: float) -> dict[str, float]:
    """The mean and the worst accuracy over all corrupted copies, as headline metrics."""
    accuracies = [float(row["accuracy"]) for row in rows]
    return {
        "corrupted_accuracy_mean": float(np.mean(accuracies)),
        "corrupted_accuracy_worst": min(accuracies),
        "corrupted_accuracy_drop": clean_accuracy - float(np.mean(accuracies)),
    }


def write_report(
    out_dir: Path,
    report: dict[str, Any],
    confusion: npt.NDArray[np.int64],
    bins: CalibrationBins,
) -> list[Path]:
    """Write every report file, each atomically; metrics.json last, so it marks a full report."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = [
            _write_text(out_dir / PER_CLASS_FILE, per_class_csv(report["per_class"])),
            _write_text(out_dir / ROBUSTNESS_FILE, robustness_markdown(report)),
            _save_figure(
                out_dir / CONFUSION_FILE, plot_confusion_matrix(confusion, report["class_names"])
            ),
            _save_figure(out_dir / RELIABILITY_FILE, plot_reliability_diagram(bins)),
            _write_text(out_dir / METRICS_FILE, json.dumps(report, indent=2) + "\n"),
        ]
    except OSError as exc:
        raise DataError(
            f"cannot write the evaluation report to {out_dir}: {exc.strerror or exc}; "
            "make it writable or choose another --out"
        ) from exc
    return files


def per_class_csv(rows: list[dict[str, Any]]) -> str:
    """The per-class table as CSV: name, precision, recall, f1, support."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["name", "precision", "recall", "f1", "support"], lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({key: f"{v:.6f}" if isinstance(v, float) else v for key, v in row.items()})
    return buffer.getvalue()


def robustness_markdown(report: dict[str, Any]) -> str:
    """The robustness table as Markdown, headed by what was evaluated and the clean accuracy."""
    dataset, metrics = report["dataset"], report["metrics"]
    lines = [
        "# Robustness",
        "",
        f"Accuracy of `{report['checkpoint']}` on the {dataset['split']} split of "
        f"`{dataset['name']}` ({dataset['num_samples']} images) under seeded corruptions "
        f"(seed {report['seed']}).",
        "",
        f"Clean accuracy: **{metrics['accuracy']:.4f}**; mean under corruption: "
        f"**{metrics['corrupted_accuracy_mean']:.4f}**.",
        "",
        "| corruption | severity | parameter | accuracy | Δ vs clean |",
        "|---|---:|---|---:|---:|",
    ]
    lines += [
        f"| {row['corruption']} | {row['severity']} | {row['parameter']} = {row['level']:g} "
        f"| {row['accuracy']:.4f} | {row['delta']:+.4f} |"
        for row in report["robustness"]
    ]
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(confusion: npt.NDArray[np.int64], class_names: Sequence[str]) -> Figure:
    """Rows normalised to recall for the colours, raw counts written in the cells."""
    from matplotlib.figure import Figure

    size = max(4.0, 0.45 * len(class_names) + 2.0)
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    axes = figure.add_subplot()
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix")
    if len(class_names) <= 20:  # beyond that the numbers are unreadable
        for (row, col), count in np.ndenumerate(confusion):
            colour = "white" if rates[row, col] > 0.5 else "black"
            axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    return figure


def plot_reliability_diagram(bins: CalibrationBins) -> Figure:
    """Accuracy per confidence bin against the diagonal, and how many predictions each bin holds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 6.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = float(bins.edges[1] - bins.edges[0])
    centres = bins.edges[:-1] + width / 2
    filled = bins.count > 0
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(
        centres[filled],
        bins.accuracy[filled],
        width=width,
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    top.bar(
        centres[filled],
        bins.confidence[filled] - bins.accuracy[filled],
        bottom=bins.accuracy[filled],
        width=width,
        fill=False,  # an outline, so the gap stays readable where it overlaps the accuracy bar
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {bins.ece:.4f}, {len(bins.count)} bins)")
    top.legend(loc="upper left")
    bottom.bar(centres, bins.count, width=width, color="tab:grey", edgecolor="black")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("predictions")
    return figure


def _write_text(path: Path, text: str) -> Path:
    return replace_atomically(path, lambda temp: temp.write_text(text))


def _save_figure(path: Path, figure: Figure) -> Path:
    # An explicit format: the temp file's suffix is not .png.
    return replace_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=120))
