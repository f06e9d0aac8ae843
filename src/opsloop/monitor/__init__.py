"""Monitoring: is the served model still seeing the world it was trained on?

`opsloop monitor check` compares a window of recent predictions from the prediction log with the
reference sample stored in the served model's bundle; `opsloop monitor serve` keeps checking and
publishes the verdict on `/metrics`. The modules, each one concern:

- `features`: image statistics, embedding projection, softmax features
- `window`: the reference sample and a window of predictions
- `stats`: two-sample tests and the multiple-testing correction
- `report`: `detect_drift` and the `DriftReport`
- `evidently_report`: Evidently's HTML report (the `monitor` extra)
- `settings`, `metrics`, `service`: the monitoring service
- `simulate`: replay clean then corrupted traffic against a running server

Torch-free, and nothing here imports the serving code.
"""

from __future__ import annotations

from opsloop.monitor.report import DEFAULT_MIN_SAMPLES, DETECTORS, DriftReport, detect_drift
from opsloop.monitor.stats import CORRECTIONS
from opsloop.monitor.window import (
    ReferenceData,
    Window,
    load_reference,
    window_from_images,
    window_from_log,
)

__all__ = [
    "CORRECTIONS",
    "DEFAULT_MIN_SAMPLES",
    "DETECTORS",
    "DriftReport",
    "ReferenceData",
    "Window",
    "detect_drift",
    "load_reference",
    "window_from_images",
    "window_from_log",
]
