"""The fast path in process: V2 infer calls, every bad infer input, payload limits, client gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest
from fastapi import FastAPI

from opsloop.serve.fastpath import parse_infer_path
from opsloop.serve.middleware import ENDPOINT_KEY, STATUS_KEY
from opsloop.serve.protocol import RequestError
from tests.serve.inprocess import INFER, assert_still_serving, infer_body, metric
from tests.serve.onnx_bundles import expected_outputs, weights_of

pytestmark = pytest.mark.anyio


async def test_infer_without_outputs_returns_every_output_the_metadata_lists(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    response = await client.post(INFER, json=infer_body(pixels, id="abc"))
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "1"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("digits", "1", "abc")
    metadata = (await client.get("/v2/models/digits")).json()
    assert [o["name"] for o in body["outputs"]] == [o["name"] for o in metadata["outputs"]]
    probs, labels, embedding = body["outputs"]
    expected, expected_embedding = expected_outputs(weights_of(0), pixels)
    np.testing.assert_allclose(np.array(probs["data"]).reshape(5, 10), expected, atol=1e-5)
    assert labels["data"] == expected.argmax(axis=1).tolist()
    assert (embedding["datatype"], embedding["shape"]) == ("FP32", [5, 16])
    np.testing.assert_allclose(
        np.array(embedding["data"]).reshape(5, 16), expected_embedding, atol=1e-5
    )
    # An empty list asks for the same: all of them.
    empty = await client.post(INFER, json=infer_body(pixels, outputs=[]))
    assert [o["name"] for o in empty.json()["outputs"]] == ["probabilities", "label", "embedding"]


async def test_infer_on_the_versioned_path_and_with_the_embedding(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    response = await client.post(
        "/v2/models/digits/versions/1/infer",
        json=infer_body(pixels[:2], outputs=[{"name": "embedding"}]),
    )
    (embedding,) = response.json()["outputs"]
    assert (embedding["name"], embedding["shape"]) == ("embedding", [2, 16])


async def test_infer_with_binary_tensors_both_ways(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    response = await client.post(
        INFER,
        content=header + pixels.tobytes(),
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    )
    assert response.status_code == 200
    length = int(response.headers["inference-header-content-length"])
    described = orjson.loads(response.content[:length])["outputs"]
    sizes = [o["parameters"]["binary_data_size"] for o in described]
    blob = response.content[length:]
    probabilities = np.frombuffer(blob[: sizes[0]], dtype="<f4").reshape(5, 10)
    labels = np.frombuffer(blob[sizes[0] : sizes[0] + sizes[1]], dtype="<i8")
    embedding = np.frombuffer(blob[sizes[0] + sizes[1] :], dtype="<f4").reshape(5, 16)
    expected, expected_embedding = expected_outputs(weights_of(0), pixels)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))
    np.testing.assert_allclose(embedding, expected_embedding, atol=1e-5)


async def test_only_post_infer_is_answered_here(client: httpx.AsyncClient) -> None:
    response = await client.get(INFER)  # passed on to FastAPI's routing, which has no such route
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


# --- bad input: a 4xx with a JSON error, never a 500, and the server keeps serving -----------


BAD_INFER: list[tuple[Any, int, str]] = [
    (b"{oops", 400, "malformed JSON"),
    (b'"just a string"', 400, "must be a JSON object"),
    ({"inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32", "data": [0] * 64}]},
     400, "does not match the model's"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "BYTES", "data": ["a"]}]},
     400, "unsupported datatype 'BYTES'"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 60}]},
     400, "has 60 values but shape [1, 1, 8, 8] needs 64"),
    (b'{"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [NaN'
     + b", 0" * 63 + b"]}]}", 400, "NaN or infinity"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                  "data": [None] * 64}]}, 400, "NaN, infinity or null"),
    ({"inputs": [{"name": "img", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]},
     400, "unknown input 'img'"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "status", "message"), BAD_INFER)
async def test_bad_infer_requests_are_rejected_clearly(
    client: httpx.AsyncClient, payload: Any, status: int, message: str
) -> None:
    content = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    response = await client.post(INFER, content=content)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    await assert_still_serving(client)


async def test_infer_on_an_unknown_model_or_version_is_404(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    for path, message in [
        ("/v2/models/mnist/infer", "unknown model 'mnist'"),
        ("/v2/models/digits/versions/9/infer", "version '9' is not loaded"),
        ("/v2/models/digits/extra/infer", "no such endpoint"),
    ]:
        response = await client.post(path, json=infer_body(pixels))
        assert response.status_code == 404
        assert message in response.json()["error"]


async def test_payload_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    big = np.ones((300, 1, 8, 8), np.float32)  # ~100 KB of JSON against a 64 KiB limit
    response = await client.post(INFER, json=infer_body(big))
    assert response.status_code == 413
    assert "payload over the 65536-byte limit" in response.json()["error"]
    upload = await client.post("/predict", files={"file": ("big.png", b"0" * 70_000, "image/png")})
    assert upload.status_code == 413
    await assert_still_serving(client)


async def test_payload_over_the_limit_without_content_length_is_413(
    client: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 8192  # streamed: no Content-Length to refuse up front

    response = await client.post(INFER, content=chunks())
    assert response.status_code == 413


async def test_a_client_gone_mid_body_is_counted_as_499_and_answered_nothing(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": INFER,
        "headers": [(b"content-type", b"application/json")],
    }
    messages = iter([{"type": "http.request", "body": b"{", "more_body": True}])
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent == []
    assert (scope[ENDPOINT_KEY], scope[STATUS_KEY]) == ("/v2/models/{model_name}/infer", 499)
    text = (await client.get("/metrics")).text
    assert (
        metric(
            text, 'opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="499"}'
        )
        == 1
    )
    await assert_still_serving(client)


# --- the path --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/digits/infer", ("digits", None)),
        ("/v2/models/digits/versions/3/infer", ("digits", "3")),
    ],
)
def test_parses_infer_paths(path: str, expected: tuple[str, str | None]) -> None:
    assert parse_infer_path(path) == expected


@pytest.mark.parametrize(
    "path", ["/v2/models//infer", "/v2/models/a/b/infer", "/v2/models/a/versions//infer"]
)
def test_rejects_malformed_infer_paths(path: str) -> None:
    with pytest.raises(RequestError, match="no such endpoint") as caught:
        parse_infer_path(path)
    assert caught.value.status == 404


async def test_a_bug_in_the_infer_path_is_a_json_500_counted_and_the_server_goes_on(
    app: FastAPI,
    client: httpx.AsyncClient,
    pixels: npt.NDArray[np.float32],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path runs outside Starlette's error middleware: it must catch its own bugs."""
    state = app.state.serve

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(state, "log_predictions", broken)
    response = await client.post(INFER, json=infer_body(pixels[:1]))
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; see the server log"}
    monkeypatch.undo()
    await assert_still_serving(client)
    text = (await client.get("/metrics")).text
    assert (
        metric(
            text, 'opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="500"}'
        )
        == 1
    )
