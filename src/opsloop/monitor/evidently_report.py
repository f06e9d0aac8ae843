"""Evidently's HTML data-drift report of a window, behind one small function (Evidently moves fast).

`write_html_report(reference, window, path, report=...)` renders every feature the detectors use
into Evidently's report; the verdict that counts is `detect_drift`'s, recorded in its metadata.
Evidently and pandas are the `monitor` extra: without them this raises `MissingExtraError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy.typing as npt

from opsloop.errors import MissingExtraError, MonitorError
from opsloop.monitor.features import IMAGE_FEATURES, image_statistics, softmax_features
from opsloop.monitor.report import DriftReport
from opsloop.monitor.window import ReferenceData, Window

logger = logging.getLogger(__name__)


def feature_table(
    reference: ReferenceData,
    images: npt.NDArray[Any],
    probabilities: npt.NDArray[Any],
    embeddings: npt.NDArray[Any],
) -> Any:
    """One pandas row per example: image statistics, embedding components and softmax outputs."""
    pd = _import("pandas")
    softmax, names = softmax_features(probabilities)
    frame = pd.DataFrame(image_statistics(images, reference.pixel_max), columns=IMAGE_FEATURES)
    projected = reference.projection.transform(embeddings).T
    for name, column in zip(reference.projection.names, projected, strict=True):
        frame[name] = column
    for index, name in enumerate(names):
        frame[name] = softmax[:, index]
    # A string column, so Evidently treats the class as categorical (chi-square), not a number.
    frame["predicted_class"] = [f"class {k}" for k in probabilities.argmax(axis=1)]
    return frame


def write_html_report(
    reference: ReferenceData,
    current: Window,
    path: str | Path,
    *,
    report: DriftReport | None = None,
) -> Path:
    """Render Evidently's data-drift report of every feature to `path` (HTML), atomically.

    Evidently's per-column flags use its own uncorrected threshold; the verdict that counts is
    `detect_drift`'s, which is recorded in the report's metadata when `report` is given.
    """
    from opsloop.atomic import replace_atomically

    evidently = _import("evidently")
    presets = _import("evidently.presets")
    frames = {
        "reference_data": feature_table(
            reference, reference.images, reference.probabilities, reference.embeddings
        ),
        "current_data": feature_table(
            reference, current.images, current.probabilities, current.embeddings
        ),
    }
    preset = presets.DataDriftPreset(num_method="ks", cat_method="chisquare")
    snapshot = evidently.Report([preset], metadata=_metadata(report)).run(**frames)
    target = Path(path)
    try:
        replace_atomically(target, lambda scratch: snapshot.save_html(str(scratch)))
    except OSError as exc:
        raise MonitorError(
            f"cannot write the HTML report to {target}: {exc.strerror or exc}; choose a "
            "writable --html path"
        ) from exc
    logger.info("wrote the drift report %s", target)
    return target


def _metadata(report: DriftReport | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {
        "opsloop_drift": str(report.drift).lower(),
        "opsloop_fired": report.fired,
        "opsloop_correction": f"{report.correction} at alpha {report.alpha}",
    }


def _import(module: str) -> Any:
    """Import a module of the `monitor` extra, or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError("the HTML drift report", "monitor", exc.name or module) from exc
