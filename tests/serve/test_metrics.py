"""Prediction metrics: one image per request takes a plain-Python path; it must count exactly
what the numpy path counts for the same rows, ties included. Observations made together (a
micro-batch's) must land in the same buckets as one at a time."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from opsloop.serve.ingest import Housekeeping
from opsloop.serve.metrics import LATENCY_BUCKETS, ServeMetrics, observe_all

CLASSES = ["a", "b", "c"]
ROWS = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]], np.float32)


def counts(metrics: ServeMetrics) -> dict[str, float | None]:
    registry = metrics.registry
    found: dict[str, float | None] = {
        name: registry.get_sample_value("opsloop_predictions_total", {"class_name": name})
        for name in CLASSES
    }
    found["confidence_sum"] = registry.get_sample_value("opsloop_prediction_confidence_sum")
    found["confident"] = registry.get_sample_value(
        "opsloop_prediction_confidence_bucket", {"le": "0.6"}
    )
    return found


def test_one_row_at_a_time_counts_what_a_batch_counts() -> None:
    batched, single = ServeMetrics(), ServeMetrics()
    batched.observe_predictions(ROWS, CLASSES)
    for row in ROWS:
        single.observe_predictions(row[None, :], CLASSES)
    assert counts(single) == counts(batched)
    # A tie goes to the first class, as argmax has it: rows 2 and 4 are "a".
    assert counts(batched)["a"] == 2
    assert counts(batched)["b"] == 1


def test_routed_answers_are_counted_by_role() -> None:
    metrics = ServeMetrics()
    metrics.observe_routed_many(["champion", "champion", "canary"])
    metrics.observe_routed_many(["champion"])
    value = metrics.registry.get_sample_value
    assert value("opsloop_routed_requests_total", {"role": "champion"}) == 3
    assert value("opsloop_routed_requests_total", {"role": "canary"}) == 1


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for metric in histogram.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


@pytest.mark.parametrize("values", [[0.0003], [0.0003, 0.001, 0.001, 0.02, 7.0, 0.0]])
def test_observing_values_together_fills_the_buckets_one_at_a_time_would(
    values: list[float],
) -> None:
    together = Histogram("t", "t", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    alone = Histogram("t", "t", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    observe_all(together, values)
    for value in values:
        alone.observe(value)
    assert samples(together) == samples(alone)
    # A value on a bucket's bound counts in that bucket (le: less than or equal).
    assert samples(together)[("t_bucket", "0.001")] == sum(v <= 0.001 for v in values)


def test_requests_answered_together_are_counted_and_timed() -> None:
    metrics = ServeMetrics()
    metrics.observe_requests("/x", 200, [0.001, 0.002, 0.003])
    metrics.observe_request("/x", 200, 0.004)
    value = metrics.registry.get_sample_value
    assert value("opsloop_requests_total", {"endpoint": "/x", "status": "200"}) == 4
    assert value("opsloop_request_latency_seconds_count", {"endpoint": "/x"}) == 4
    assert value("opsloop_request_latency_seconds_sum", {"endpoint": "/x"}) == pytest.approx(0.01)


def test_housekeeping_sets_the_log_size_gauges_and_counts_what_retention_deleted() -> None:
    metrics = ServeMetrics()
    metrics.record_housekeeping(Housekeeping(deleted_rows=7, rows=30, bytes=9000, backlog_bytes=12))
    metrics.record_housekeeping(Housekeeping(deleted_rows=0, rows=25, bytes=8000, backlog_bytes=0))
    value = metrics.registry.get_sample_value
    assert value("opsloop_predlog_size_rows") == 25  # the latest measure, not a sum
    assert value("opsloop_predlog_size_bytes") == 8000
    assert value("opsloop_journal_backlog_bytes") == 0
    assert value("opsloop_predlog_deleted_rows_total") == 7
