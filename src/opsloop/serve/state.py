"""What the routes share: `AppState` (settings, metrics, the champion and the candidate model,
the prediction log, the label store, the inference executor).

`build_state(settings, source)` makes it once per app; routes get it through the FastAPI
dependency `get_state`, which tests can swap with `app.dependency_overrides[get_state]`. It also
decides who answers a request (`route`: the champion, or for a canary share the candidate) and
runs the candidate in shadow off the response path (`shadow`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import Request

from opsloop.predictions import CANARY_ROLE, CHAMPION_ROLE, SHADOW_ROLE
from opsloop.serve.batching import BatcherClosedError
from opsloop.serve.feedback import FeedbackStore, NullFeedbackStore
from opsloop.serve.journal import stacked
from opsloop.serve.manager import BatchingLimits, ModelManager, ServedModel
from opsloop.serve.metrics import ServeMetrics
from opsloop.serve.predlog import LogRecord, NullPredictionLog, PredictionLog, RecordBatch
from opsloop.serve.protocol import RequestError
from opsloop.serve.runtime import SessionTuning
from opsloop.serve.settings import ServeSettings
from opsloop.serve.source import ModelSource

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything the routes share, built by `create_app` and started in the lifespan."""

    settings: ServeSettings
    metrics: ServeMetrics
    manager: ModelManager
    predlog: PredictionLog
    executor: ThreadPoolExecutor
    feedback: FeedbackStore = field(default_factory=NullFeedbackStore)
    candidate: ModelManager | None = None  # shadow / canary; None when both are off
    _shadow_pending: int = field(default=0, init=False)
    _shadow_records: list[LogRecord] = field(default_factory=list, init=False)

    async def start(self) -> None:
        """Open the log and the label store, load the champion (and the candidate)."""
        poll = self.settings.reload_poll_seconds
        await asyncio.to_thread(self.predlog.start)
        await asyncio.to_thread(self.feedback.start)
        await self.manager.start(poll)
        logger.info("serving %s", self.manager.source.describe())
        if self.candidate is not None:
            await self.candidate.start(poll)
            mode = "shadow" if self.settings.shadow else ""
            if self.settings.canary_fraction > 0:
                mode += f"{' and ' if mode else ''}canary {self.settings.canary_fraction:g}"
            logger.info("candidate %s (%s)", self.candidate.source.describe(), mode)

    async def close(self) -> None:
        """Answer everything queued, finish shadow work, then write everything logged."""
        await self.manager.close()
        if self.candidate is not None:
            await self.candidate.close()
        self._write_shadow_records()  # the candidate's close answered every shadow run
        await asyncio.to_thread(self.predlog.close)
        await asyncio.to_thread(self.feedback.close)
        self.executor.shutdown(wait=True)

    def route(self, served: ServedModel, request_id: str) -> tuple[ServedModel, str]:
        """Who answers this request: the candidate for the canary share, else the champion.

        The share is picked by a hash of the request id, so a client that retries with its own
        id gets the same model; without a client id the server's random id makes it random.
        """
        fraction = self.settings.canary_fraction
        candidate = self.candidate.current if self.candidate is not None else None
        if (
            fraction > 0
            and candidate is not None
            and candidate.signature.item_shape == served.signature.item_shape
            and canary_bucket(request_id) < fraction
        ):
            return candidate, CANARY_ROLE
        return served, CHAMPION_ROLE

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
        role: str = CHAMPION_ROLE,
    ) -> None:
        """Journal an answered prediction (one `write`) and count it in the metrics."""
        prediction = Prediction(request_id, endpoint, served, pixels, outputs, started, role)
        self.log_predictions([prediction])

    def log_predictions(self, predictions: Sequence[Prediction]) -> None:
        """Journal answered predictions in one `write` and count them, per model in one go.

        The answers of one micro-batch arrive together: counting their classes and writing the
        journal once for all of them costs about what doing it for one does. (Their embeddings
        were projected onto the log basis once per batch, by `OnnxModel.serve_batch`.)
        """
        groups = by_model(predictions)
        for served, group in groups:
            probabilities = stacked([p.outputs[0] for p in group])
            self.metrics.observe_predictions(probabilities, served.signature.class_names)
        self.metrics.observe_routed_many([p.role for p in predictions])
        rate = self.settings.predlog_sample
        if rate < 1.0:  # sampled out: not logged, not shadowed
            kept = [p for p in predictions if random.random() < rate]
            unsampled = sum(len(p.pixels) for p in predictions) - sum(len(p.pixels) for p in kept)
            if unsampled:
                self.metrics.predlog_unsampled_rows.inc(unsampled)
            predictions = kept
            groups = by_model(predictions)
        if predictions:  # each model's answers as one batch: their arrays' shapes match
            self.predlog.append_batches([record_batch(group, rate) for _, group in groups])
        if self.settings.shadow:
            for prediction in predictions:
                if prediction.role == CHAMPION_ROLE:
                    self.shadow(prediction.request_id, prediction.endpoint, prediction.pixels)

    def shadow(self, request_id: str, endpoint: str, pixels: npt.NDArray[np.float32]) -> None:
        """Run the candidate on the same rows later, off the response path, and log its answer.

        The rows go on the candidate's own micro-batcher (shadow requests batch together), which
        hands the outputs to a `ShadowRun`, not a task: the response never waits for it. Past
        `shadow_max_pending_rows` rows waiting it is skipped and counted instead, so a slow
        candidate cannot slow the champion's answers. The answers of one candidate batch reach
        the journal in one write.
        """
        candidate = self.candidate.current if self.candidate is not None else None
        if candidate is None or candidate.signature.item_shape != tuple(pixels.shape[1:]):
            return
        rows = len(pixels)
        if self._shadow_pending + rows > self.settings.shadow_max_pending_rows:
            self.metrics.shadow_rows.labels("skipped").inc(rows)
            return
        run = ShadowRun(self, candidate, request_id, endpoint, pixels)
        try:
            candidate.batcher.submit_to(pixels, run)
        except BatcherClosedError:  # the candidate is being swapped: skip, never raise
            self.metrics.shadow_rows.labels("failed").inc(rows)
            return
        self._shadow_pending += rows

    def shadow_failed(self, run: ShadowRun, exception: BaseException) -> None:
        self._shadow_pending -= len(run.pixels)
        self.metrics.shadow_rows.labels("failed").inc(len(run.pixels))
        logger.debug("shadow run of %s failed: %s", run.request_id, exception)

    def shadow_answered(self, run: ShadowRun, outputs: tuple[npt.NDArray[Any], ...]) -> None:
        """Keep the candidate's answer; the answers of one candidate batch, which arrive in
        the same loop iteration, are journaled together just after it."""
        self._shadow_pending -= len(run.pixels)
        probabilities, _, logged_embedding = outputs
        if not self._shadow_records:  # the first answer of this batch: write them all after it
            asyncio.get_running_loop().call_soon(self._write_shadow_records)
        signature = run.candidate.signature
        self._shadow_records.append(
            LogRecord(
                request_id=run.request_id,
                created_at=time.time(),
                endpoint=run.endpoint,
                model_name=signature.name,
                model_version=signature.version,
                inputs=run.pixels,
                probabilities=probabilities,
                embedding=logged_embedding,
                latency_ms=(time.perf_counter() - run.started) * 1000.0,
                role=SHADOW_ROLE,
                sample_rate=self.settings.predlog_sample,
            )
        )

    def _write_shadow_records(self) -> None:
        records, self._shadow_records = self._shadow_records, []
        if records:
            self.predlog.append_many(records)
            self.metrics.shadow_rows.labels("logged").inc(sum(len(r.inputs) for r in records))


class ShadowRun:
    """One request's rows on the candidate's micro-batcher (a `batching.Waiter`): the
    candidate's answer is logged, never sent."""

    __slots__ = ("candidate", "endpoint", "finished", "pixels", "request_id", "started", "state")

    def __init__(
        self,
        state: AppState,
        candidate: ServedModel,
        request_id: str,
        endpoint: str,
        pixels: npt.NDArray[np.float32],
    ) -> None:
        self.state = state
        self.candidate = candidate
        self.request_id = request_id
        self.endpoint = endpoint
        self.pixels = pixels
        self.started = time.perf_counter()
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, outputs: tuple[npt.NDArray[Any], ...], /) -> None:
        self.finished = True
        self.state.shadow_answered(self, outputs)

    def set_exception(self, exception: BaseException, /) -> None:
        self.finished = True
        self.state.shadow_failed(self, exception)


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class Prediction:
    """An answered request, to log: its id, where it came in, who answered and with what."""

    request_id: str
    endpoint: str
    served: ServedModel
    pixels: npt.NDArray[np.float32]
    outputs: tuple[npt.NDArray[Any], ...]  # (probabilities, embedding, logged embedding)
    started: float  # time.perf_counter() when the request arrived
    role: str = CHAMPION_ROLE


def by_model(predictions: Sequence[Prediction]) -> list[tuple[ServedModel, list[Prediction]]]:
    """The predictions grouped by the model that answered them (usually one group)."""
    groups: dict[int, tuple[ServedModel, list[Prediction]]] = {}
    for prediction in predictions:
        key = id(prediction.served)
        if key not in groups:
            groups[key] = (prediction.served, [])
        groups[key][1].append(prediction)
    return list(groups.values())


def record_batch(predictions: Sequence[Prediction], sample_rate: float) -> RecordBatch:
    """The journal batch of predictions one model answered (so their arrays' shapes match)."""
    now, done = time.time(), time.perf_counter()
    signature = predictions[0].served.signature
    count = len(predictions)
    return RecordBatch(
        request_ids=[p.request_id for p in predictions],
        created_at=[now] * count,
        endpoints=[p.endpoint for p in predictions],
        model_names=[signature.name] * count,
        model_versions=[signature.version] * count,
        latency_ms=[(done - p.started) * 1000.0 for p in predictions],
        roles=[p.role for p in predictions],
        sample_rates=[sample_rate] * count,
        rows=[len(p.pixels) for p in predictions],
        inputs=stacked([p.pixels for p in predictions]),
        probabilities=stacked([p.outputs[0] for p in predictions]),
        embedding=stacked([p.outputs[2] for p in predictions]),  # the log-basis coordinates
    )


def canary_bucket(request_id: str) -> float:
    """A request id's stable place in [0, 1): the same id always lands in the same place."""
    return zlib.crc32(request_id.encode()) / 2**32


def build_state(
    settings: ServeSettings, source: ModelSource, candidate: ModelSource | None = None
) -> AppState:
    """The state of one app: nothing starts here; the lifespan starts the log and the model."""
    metrics = ServeMetrics()
    # One inference thread per process: batches run one at a time, and the next batch queues up
    # while the current one runs, which is what makes batches grow under load.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
    manager = ModelManager(
        source,
        executor=None if settings.inference_thread == "false" else executor,
        inline_when_faster=settings.inference_thread == "auto",
        metrics=metrics,
        tuning=SessionTuning(settings.ort_intra_op_threads, settings.ort_inter_op_threads),
        limits=BatchingLimits(settings.max_batch_size, settings.max_batch_wait_ms / 1000.0),
    )
    predlog = (
        prediction_log_of(settings, metrics) if settings.predlog_enabled else NullPredictionLog()
    )
    feedback = (
        FeedbackStore(settings.resolved_predlog_url(), settings.predlog_engine_options())
        if settings.predlog_enabled
        else NullFeedbackStore()
    )
    return AppState(
        settings,
        metrics,
        manager,
        predlog,
        executor,
        feedback=feedback,
        candidate=candidate_manager(settings, executor, metrics, candidate),
    )


def prediction_log_of(settings: ServeSettings, metrics: ServeMetrics) -> PredictionLog:
    """The process's log: its journal, and the ingester thread unless a supervisor runs one."""
    return PredictionLog(
        settings.resolved_predlog_url(),
        journal_dir=settings.resolved_journal_dir(),
        ingest_in_process=settings.ingest_in_process,
        fsync=settings.journal_fsync,
        max_journal_bytes=settings.journal_max_bytes,
        batch_rows=settings.predlog_batch_rows,
        flush_interval_s=settings.predlog_flush_ms / 1000.0,
        on_written=metrics.predlog_rows.inc,
        on_dropped=metrics.predlog_dropped_rows.inc,
        engine_options=settings.predlog_engine_options(),
        retention=settings.predlog_retention(),
        on_housekeeping=metrics.record_housekeeping,
    )


def candidate_manager(
    settings: ServeSettings,
    executor: ThreadPoolExecutor,
    metrics: ServeMetrics,
    source: ModelSource | None,
) -> ModelManager | None:
    """The candidate's manager (on the same inference thread), when shadow or canary is on."""
    if source is None:
        return None
    wait_ms = settings.max_batch_wait_ms
    if settings.canary_fraction == 0:  # shadow only: nobody waits for the candidate's answers
        wait_ms = max(wait_ms, settings.shadow_batch_wait_ms)
    return ModelManager(
        source,
        executor=None if settings.inference_thread == "false" else executor,
        inline_when_faster=settings.inference_thread == "auto",
        metrics=metrics,
        tuning=SessionTuning(settings.ort_intra_op_threads, settings.ort_inter_op_threads),
        limits=BatchingLimits(settings.max_batch_size, wait_ms / 1000.0),
        candidate=True,
    )


async def get_state(request: Request) -> AppState:
    """The app's state, as a FastAPI dependency (async, so FastAPI calls it without a thread)."""
    state: AppState = request.app.state.serve
    return state
