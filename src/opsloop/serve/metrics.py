"""Prometheus metrics of the inference server, correct with one worker or several.

With several uvicorn workers, `PROMETHEUS_MULTIPROC_DIR` must name an empty directory before the
workers start (`opsloop serve` does this); each process then writes its samples there and
`/metrics` aggregates them all, whichever worker answers the scrape. Label children used on the
hot path are cached, so recording a request costs a few dictionary look-ups.
"""

from __future__ import annotations

import bisect
import collections
import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from opsloop.serve.ingest import Housekeeping

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each value, in one update per bucket hit instead of two per
    value: in multiprocess mode every update is a locked write to a memory-mapped file.

    It reaches into prometheus_client's histogram (`_sum`, `_buckets`, `_upper_bounds`, the
    same since 0.4); a version without them gets plain `observe` calls.
    """
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if len(values) == 1 or buckets is None or bounds is None:
        for value in values:
            histogram.observe(value)
        return
    histogram._sum.inc(sum(values))
    for index, count in collections.Counter(bisect.bisect_left(bounds, v) for v in values).items():
        buckets[index].inc(count)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ServeMetrics:
    """Every metric the server exports, registered in a private registry per app."""

    def record_housekeeping(self, done: Housekeeping) -> None:
        """The ingester's latest measure of the log, and what retention deleted."""
        self.predlog_size_rows.set(done.rows)
        self.predlog_size_bytes.set(done.bytes)
        self.journal_backlog_bytes.set(done.backlog_bytes)
        if done.deleted_rows:
            self.predlog_deleted_rows.inc(done.deleted_rows)

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter = functools.partial(Counter, registry=self.registry)
        histogram = functools.partial(Histogram, registry=self.registry)
        self.requests = counter(
            "opsloop_requests", "HTTP requests by endpoint and status", ["endpoint", "status"]
        )
        self.latency = histogram(
            "opsloop_request_latency_seconds",
            "Request latency inside the server",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = histogram(
            "opsloop_batch_size",
            "Rows per ONNX Runtime call (micro-batching)",
            buckets=BATCH_BUCKETS,
        )
        self.inference = histogram(
            "opsloop_inference_seconds", "Seconds per ONNX Runtime call", buckets=INFERENCE_BUCKETS
        )
        self.model_info = Gauge(
            "opsloop_model_info",
            "The served model: 1 for the version being served",
            ["model_name", "model_version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.predictions = counter(
            "opsloop_predictions", "Predictions by predicted class", ["class_name"]
        )
        self.confidence = histogram(
            "opsloop_prediction_confidence",
            "Probability of the predicted class",
            buckets=CONFIDENCE_BUCKETS,
        )
        self.rejected = counter(
            "opsloop_rejected_inputs",
            "Requests rejected as bad input, by reason",
            ["endpoint", "reason"],
        )
        self.reloads = counter("opsloop_model_reloads", "Model (re)loads by outcome", ["outcome"])
        self.predlog_rows = counter("opsloop_predlog_rows", "Rows written to the prediction log")
        self.predlog_dropped_rows = counter(
            "opsloop_predlog_dropped_rows",
            "Rows the prediction log gave up on: the journal was full while the database was away",
        )
        self.predlog_unsampled_rows = counter(
            "opsloop_predlog_unsampled_rows",
            "Answered rows left out of the log by sampling (OPSLOOP_PREDLOG_SAMPLE)",
        )
        # Written by the ingester process (the most recent value wins across processes).
        self.predlog_size_rows = Gauge(
            "opsloop_predlog_size_rows",
            "Examples in the prediction log's table",
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.predlog_size_bytes = Gauge(
            "opsloop_predlog_size_bytes",
            "Bytes the prediction log's database takes (its tables, with indexes)",
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.journal_backlog_bytes = Gauge(
            "opsloop_journal_backlog_bytes",
            "Journal bytes written by the workers but not yet in the database",
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.predlog_deleted_rows = counter(
            "opsloop_predlog_deleted_rows",
            "Examples deleted from the log by retention (OPSLOOP_PREDLOG_RETENTION_*)",
        )
        self.candidate_info = Gauge(
            "opsloop_candidate_info",
            "The candidate model (shadow or canary): 1 for the version loaded",
            ["model_name", "model_version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.routed = counter(
            "opsloop_routed_requests", "Answered requests by who answered them", ["role"]
        )
        self.shadow_rows = counter(
            "opsloop_shadow_rows",
            "Rows the candidate ran in shadow: logged, skipped (backlog full) or failed",
            ["outcome"],
        )
        self.feedback_labels = counter(
            "opsloop_feedback_labels", "Labels received on /feedback", ["outcome"]
        )
        self._request_children: dict[tuple[str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._class_children: dict[str, Any] = {}
        self._routed_children: dict[str, Any] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.observe_requests(endpoint, status, [seconds])

    def observe_requests(self, endpoint: str, status: int, seconds: Sequence[float]) -> None:
        """Requests answered together (one micro-batch's), counted and timed in one update."""
        key = (endpoint, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(endpoint, str(status))
        child.inc(len(seconds))
        latency = self._latency_children.get(endpoint)
        if latency is None:
            latency = self._latency_children[endpoint] = self.latency.labels(endpoint)
        observe_all(latency, seconds)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference.observe(seconds)

    def observe_predictions(
        self, probabilities: npt.NDArray[np.float32], class_names: Sequence[str]
    ) -> None:
        """Count predicted classes and record each prediction's confidence."""
        if len(probabilities) == 1:  # one image: plain Python costs less than numpy here
            row = probabilities[0].tolist()
            confidences = [max(row)]
            counts = {row.index(confidences[0]): 1}  # the first maximum, as argmax picks
        else:
            labels = probabilities.argmax(axis=1)
            confidences = probabilities[np.arange(len(labels)), labels].tolist()
            counts = collections.Counter(labels.tolist())
        for label, count in counts.items():
            name = class_names[label]
            child = self._class_children.get(name)
            if child is None:
                child = self._class_children[name] = self.predictions.labels(name)
            child.inc(count)
        observe_all(self.confidence, confidences)

    def observe_routed_many(self, roles: Sequence[str]) -> None:
        """Requests answered, by who answered them (the champion, or a canary)."""
        for role, count in collections.Counter(roles).items():
            child = self._routed_children.get(role)
            if child is None:
                child = self._routed_children[role] = self.routed.labels(role)
            child.inc(count)

    def reject(self, endpoint: str, reason: str) -> None:
        self.rejected.labels(endpoint, reason).inc()

    def model_loaded(
        self, name: str, version: str, previous: tuple[str, str] | None, *, candidate: bool = False
    ) -> None:
        """The served (or, with `candidate`, the shadow/canary) model changed."""
        gauge = self.candidate_info if candidate else self.model_info
        if previous is not None and previous != (name, version):
            gauge.labels(*previous).set(0)
        gauge.labels(name, version).set(1)
        self.reloads.labels("loaded").inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this process's registry, or every worker's in multiprocess mode."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
