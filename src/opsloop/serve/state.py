"""What the routes share: `AppState` (settings, metrics, model manager, prediction log, executor).

`build_state(settings, source)` makes it once per app; routes get it through the FastAPI
dependency `get_state`, which tests can swap with `app.dependency_overrides[get_state]`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import Request

from opsloop.serve.manager import BatchingLimits, ModelManager, ServedModel
from opsloop.serve.metrics import ServeMetrics
from opsloop.serve.predlog import LogRecord, NullPredictionLog, PredictionLog
from opsloop.serve.protocol import RequestError
from opsloop.serve.runtime import SessionTuning
from opsloop.serve.settings import ServeSettings
from opsloop.serve.source import ModelSource


@dataclass
class AppState:
    """Everything the routes share, built by `create_app` and started in the lifespan."""

    settings: ServeSettings
    metrics: ServeMetrics
    manager: ModelManager
    predlog: PredictionLog
    executor: ThreadPoolExecutor

    def served(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The current model, if it is the one asked for: 503 while loading, 404 for another."""
        served = self.manager.current
        if served is None:
            reason = self.manager.last_error or "the model is still loading"
            raise RequestError(f"model not loaded yet: {reason}", status=503, reason="not_ready")
        signature = served.signature
        if name is not None and name != signature.name:
            raise RequestError(
                f"unknown model {name!r}; this server serves {signature.name!r}",
                status=404,
                reason="unknown_model",
            )
        if version and version != signature.version:
            raise RequestError(
                f"model {name!r} version {version!r} is not loaded; the server has version "
                f"{signature.version!r}",
                status=404,
                reason="unknown_version",
            )
        return served

    def log_prediction(
        self,
        *,
        request_id: str,
        endpoint: str,
        served: ServedModel,
        pixels: npt.NDArray[np.float32],
        outputs: tuple[npt.NDArray[Any], ...],
        started: float,
    ) -> None:
        """Queue the prediction for the log and count it in the metrics (no I/O here)."""
        probabilities, embedding = outputs
        self.predlog.append(
            LogRecord(
                request_id=request_id,
                created_at=time.time(),
                endpoint=endpoint,
                model_name=served.signature.name,
                model_version=served.signature.version,
                inputs=pixels,
                probabilities=probabilities,
                embedding=embedding,
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
        )
        self.metrics.observe_predictions(probabilities, served.signature.class_names)


def build_state(settings: ServeSettings, source: ModelSource) -> AppState:
    """The state of one app: nothing starts here; the lifespan starts the log and the model."""
    metrics = ServeMetrics()
    # One inference thread per process: batches run one at a time, and the next batch queues up
    # while the current one runs, which is what makes batches grow under load.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
    manager = ModelManager(
        source,
        executor=executor if settings.inference_thread else None,
        metrics=metrics,
        tuning=SessionTuning(settings.ort_intra_op_threads, settings.ort_inter_op_threads),
        limits=BatchingLimits(settings.max_batch_size, settings.max_batch_wait_ms / 1000.0),
    )
    predlog = (
        PredictionLog(
            settings.resolved_predlog_url(),
            batch_rows=settings.predlog_batch_rows,
            flush_interval_s=settings.predlog_flush_ms / 1000.0,
            on_written=metrics.predlog_rows.inc,
        )
        if settings.predlog_enabled
        else NullPredictionLog()
    )
    return AppState(settings, metrics, manager, predlog, executor)


async def get_state(request: Request) -> AppState:
    """The app's state, as a FastAPI dependency (async, so FastAPI calls it without a thread)."""
    state: AppState = request.app.state.serve
    return state
