"""Prediction metrics: one image per request takes a plain-Python path; it must count exactly
what the numpy path counts for the same rows, ties included."""

from __future__ import annotations

import numpy as np

from opsloop.serve.metrics import ServeMetrics

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
    for role in ("champion", "champion", "canary"):
        metrics.observe_routed(role)
    value = metrics.registry.get_sample_value
    assert value("opsloop_routed_requests_total", {"role": "champion"}) == 2
    assert value("opsloop_routed_requests_total", {"role": "canary"}) == 1
