"""Windows for the monitoring tests: drawn from held-out digits, shifted by a corruption, logged."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from opsloop.bundle import load_bundle, run_onnx
from opsloop.corruption import CORRUPTIONS, to_dtype
from opsloop.monitor import (
    Window,
    window_from_images,
)
from opsloop.serve.predlog import LogRecord

if TYPE_CHECKING:
    from opsloop.export import ExportResult


Images = npt.NDArray[np.uint8]


def draw(images: Images, n: int, seed: int) -> Images:
    """A window drawn without replacement."""
    return images[np.random.default_rng(seed).choice(len(images), size=n, replace=False)]


def shifted(images: Images, name: str, level: float, seed: int = 0) -> Images:
    corruption = CORRUPTIONS[name]
    changed = corruption.transform(
        images.astype(np.float64), level, 16.0, np.random.default_rng(seed)
    )
    return np.asarray(to_dtype(np.clip(changed, 0, 16), images.dtype), dtype=np.uint8)


def window(bundle: ExportResult, images: Images) -> Window:
    return window_from_images(images, load_bundle(bundle.path))


def record(
    session: Any, images: Images, *, version: str = "3", at: float | None = None
) -> LogRecord:
    outputs = run_onnx(session, images)
    return LogRecord(
        request_id=f"r{time.monotonic_ns()}",
        created_at=time.time() if at is None else at,
        endpoint="infer",
        model_name="digits",
        model_version=version,
        inputs=images.astype(np.float32),
        probabilities=outputs["probabilities"],
        embedding=outputs["embedding"],
        latency_ms=1.0,
    )
