"""`POST /feedback`: labels checked against the served classes, stored by the log, joined late."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from opsloop.predictions import NO_LABEL, read_label_events, read_predictions
from opsloop.serve.app import create_app
from opsloop.serve.feedback import Label, parse_labels
from opsloop.serve.protocol import RequestError
from tests.serve.inprocess import INFER, infer_body, make_settings, running

pytestmark = pytest.mark.anyio
CLASSES = tuple(str(k) for k in range(10))


def log_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'predictions.db'}"


async def test_labels_join_their_predictions_whenever_they_arrive(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    # A label for a request the log has not flushed yet (it does not even exist yet).
    early = await client.post("/feedback", json={"request_id": "order-1", "item": 1, "label": 3})
    assert early.status_code == 200
    assert early.json() == {"accepted": 1}
    answer = await client.post(INFER, json=infer_body(pixels[:2], id="order-1"))
    assert answer.status_code == 200
    assert answer.json()["id"] == "order-1"
    # Then the first row, twice: the newest label wins, the change is kept.
    body = [
        {"request_id": "order-1", "label": "5"},
        {"request_id": "order-1", "item": 0, "label": 7},
    ]
    assert (await client.post("/feedback", json=body)).json() == {"accepted": 2}
    await asyncio.sleep(0.2)  # the log's writer flushes every 20 ms here
    logged = read_predictions(log_url(tmp_path), request_id="order-1")
    assert list(logged.items) == [0, 1]
    assert list(logged.true_labels) == [7, 3]
    assert all(logged.labelled_at > logged.created_at[0] - 1)
    events = read_label_events(log_url(tmp_path), "order-1")
    assert [(e.item, e.label) for e in events] == [(1, 3), (0, 5), (0, 7)]


async def test_an_unlabelled_prediction_reads_as_no_label(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    assert (await client.post(INFER, json=infer_body(pixels[:1], id="quiet"))).status_code == 200
    await asyncio.sleep(0.2)
    logged = read_predictions(log_url(tmp_path), request_id="quiet")
    assert list(logged.true_labels) == [NO_LABEL]
    assert not logged.labelled.any()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"request_id": "r", "label": 10}, 422, "use an index 0..9 or one of the names 0, 1"),
        ({"request_id": "r", "label": "cat"}, 422, "'cat' is not a class of the served model"),
        ({"request_id": "", "label": 1}, 422, "request_id must be"),
        ({"request_id": "x" * 129, "label": 1}, 422, "1 to 128 characters"),
        ({"request_id": "r", "item": -1, "label": 1}, 422, "item -1 must be"),
        ({"request_id": "r", "item": "0", "label": 1}, 422, "item '0' must be"),
        ([], 422, "send at least one label"),
        ([{"request_id": "r", "label": 1}, 7], 422, "label 1 must be an object"),
    ],
)
async def test_bad_labels_are_422_and_store_nothing(
    client: httpx.AsyncClient, tmp_path: Path, body: object, status: int, message: str
) -> None:
    response = await client.post("/feedback", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert read_label_events(log_url(tmp_path), "r") == []


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/feedback", content=b"{not json")
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


async def test_a_feedback_token_is_required_when_set(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, feedback_token="labels-only"))
    label = {"request_id": "r", "label": 1}
    async for client in running(app):
        assert (await client.post("/feedback", json=label)).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert (await client.post("/feedback", json=label, headers=wrong)).status_code == 403
        right = {"authorization": "Bearer labels-only"}
        response = await client.post("/feedback", json=label, headers=right)
        assert response.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'opsloop_feedback_labels_total{outcome="stored"} 1.0' in metrics


async def test_with_the_log_off_labels_are_refused_with_the_reason(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, predlog_url="none"))
    async for client in running(app):
        response = await client.post("/feedback", json={"request_id": "r", "label": 1})
        assert response.status_code == 503
        assert "the prediction log is off" in response.json()["error"]


def test_parse_labels_takes_indices_and_names() -> None:
    parsed = parse_labels(
        [{"request_id": "a", "label": "9"}, {"request_id": "b", "label": 0}], CLASSES
    )
    assert parsed == [Label("a", 0, 9), Label("b", 0, 0)]
    with pytest.raises(RequestError, match="over the limit"):
        parse_labels([{"request_id": "a", "label": 1}] * 10_001, CLASSES)


async def test_the_feedback_route_is_documented(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/feedback"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/FeedbackLabel"} in body["oneOf"]
    assert "request_id" in spec["components"]["schemas"]["FeedbackLabel"]["properties"]
    assert {"401", "403", "422", "503"} <= set(operation["responses"])
