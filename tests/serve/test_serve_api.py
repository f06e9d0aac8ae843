"""The HTTP API in process (httpx over ASGI): endpoints, every bad input, admin auth, reload."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest
from fastapi import FastAPI
from PIL import Image

from opsloop.predictions import read_predictions
from opsloop.serve.app import create_app
from opsloop.serve.settings import ServeSettings, load_settings
from tests.serve.onnx_bundles import expected_outputs, weights_of, write_bundle

pytestmark = pytest.mark.anyio

TOKEN = "let-me-in"
INFER = "/v2/models/digits/infer"


def make_settings(tmp_path: Path, bundle: Path, **overrides: Any) -> ServeSettings:
    options: dict[str, Any] = {
        "bundle_path": bundle,
        "workspace": tmp_path,
        "predlog_url": f"sqlite:///{tmp_path / 'predictions.db'}",
        "predlog_flush_ms": 20,
        "admin_token": TOKEN,
        "reload_poll_seconds": 0,
        "max_payload_bytes": 64 * 1024,
    }
    return load_settings(**(options | overrides))


async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


@pytest.fixture
def app(tmp_path: Path, tiny_bundle: Path) -> FastAPI:
    return create_app(make_settings(tmp_path, tiny_bundle))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in running(app):
        yield c


def infer_body(pixels: npt.NDArray[np.float32], **request: Any) -> dict[str, Any]:
    tensor = {
        "name": "pixels",
        "shape": list(pixels.shape),
        "datatype": "FP32",
        "data": pixels.ravel().tolist(),
    }
    return {"inputs": [tensor]} | request


def png(ink: int = 255, size: int = 64) -> bytes:
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[:, size * 3 // 8 : size * 5 // 8] = ink
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


async def assert_still_serving(client: httpx.AsyncClient) -> None:
    response = await client.post(INFER, json=infer_body(np.ones((1, 1, 8, 8), np.float32)))
    assert response.status_code == 200


# --- health and metadata ------------------------------------------------------------------------


async def test_health_and_metadata(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    server = (await client.get("/v2")).json()
    assert server["name"] == "opsloop"
    assert "binary_tensor_data" in server["extensions"]
    for path in ("/v2/models/digits", "/v2/models/digits/versions/1"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["x-model-version"] == "1"
        metadata = response.json()
        assert metadata["versions"] == ["1"]
        assert metadata["inputs"][0]["shape"] == [-1, 1, 8, 8]
    for path in ("/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"):
        assert (await client.get(path)).json() == {"name": "digits", "ready": True}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/mnist", "unknown model 'mnist'; this server serves 'digits'"),
        ("/v2/models/mnist/ready", "unknown model 'mnist'"),
        ("/v2/models/digits/versions/7", "version '7' is not loaded; the server has version '1'"),
        ("/v2/models/digits/versions/7/ready", "version '7' is not loaded"),
        ("/nothing/here", "Not Found"),
    ],
)
async def test_unknown_models_and_versions_are_404(
    client: httpx.AsyncClient, path: str, message: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert message in response.json()["error"]


async def test_docs_describe_every_endpoint(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
        "/predict",
        "/metrics",
        "/admin/reload",
    ):
        assert path in paths
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "InferRequest"
    )


# --- inference --------------------------------------------------------------------------------


async def test_infer_returns_probabilities_and_labels(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    response = await client.post(INFER, json=infer_body(pixels, id="abc"))
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "1"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("digits", "1", "abc")
    probs, labels = body["outputs"]
    expected, _ = expected_outputs(weights_of(0), pixels)
    np.testing.assert_allclose(np.array(probs["data"]).reshape(5, 10), expected, atol=1e-5)
    assert labels["data"] == expected.argmax(axis=1).tolist()


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
    labels = np.frombuffer(blob[sizes[0] :], dtype="<i8")
    expected, _ = expected_outputs(weights_of(0), pixels)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))


async def test_predict_classifies_an_uploaded_image(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", files={"file": ("digit.png", png(), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "1"
    assert response.headers["x-model-version"] == "1"
    assert len(body["request_id"]) == 32
    assert set(body["probabilities"]) == {str(i) for i in range(10)}
    assert body["class_name"] == str(body["label"])
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    raw = await client.post("/predict", content=png(), headers={"content-type": "image/png"})
    assert raw.json()["label"] == body["label"]


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


@pytest.mark.parametrize(
    ("files", "content", "content_type", "status", "message"),
    [
        ({"file": ("notes.txt", b"just some text", "text/plain")}, None, None, 400, "not an image"),
        ({"file": ("cut.png", png()[:-40], "image/png")}, None, None, 400, "truncated or corrupt"),
        ({"file": ("empty.png", b"", "image/png")}, None, None, 400, "upload is empty"),
        ({"photo": ("d.png", png(), "image/png")}, None, None, 400, "no 'file' field"),
        (None, b"hello", "text/plain", 415, "unsupported content type"),
    ],
)
async def test_bad_uploads_are_rejected_clearly(
    client: httpx.AsyncClient,
    files: Any,
    content: bytes | None,
    content_type: str | None,
    status: int,
    message: str,
) -> None:
    headers = {"content-type": content_type} if content_type else None
    response = await client.post("/predict", files=files, content=content, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]
    await assert_still_serving(client)


async def test_a_bad_invert_parameter_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/predict?invert=sideways", files={"file": ("d.png", png(), "image/png")}
    )
    assert response.status_code == 400
    assert "invert='sideways'" in response.json()["error"]


async def test_not_loaded_yet_is_503_and_the_server_still_answers(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, tmp_path / "not-exported-yet"))
    async for client in running(app):
        assert (await client.get("/v2/health/live")).status_code == 200
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "model not loaded yet" in ready.json()["error"]
        assert "opsloop export" in ready.json()["error"]
        for response in (
            await client.post(INFER, json=infer_body(np.ones((1, 1, 8, 8), np.float32))),
            await client.post("/predict", files={"file": ("d.png", png(), "image/png")}),
            await client.get("/v2/models/digits"),
        ):
            assert response.status_code == 503
            assert "model not loaded yet" in response.json()["error"]


# --- admin and reload ---------------------------------------------------------------------------


async def test_admin_reload_needs_the_token(client: httpx.AsyncClient) -> None:
    missing = await client.post("/admin/reload")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing admin token" in missing.json()["error"]
    wrong = await client.post("/admin/reload", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert wrong.json() == {"error": "wrong admin token"}
    basic = await client.post("/admin/reload", headers={"authorization": "Basic abc"})
    assert basic.status_code == 401


async def test_admin_is_disabled_without_a_configured_token(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, admin_token=None))
    async for client in running(app):
        response = await client.post("/admin/reload", headers={"authorization": "Bearer x"})
        assert response.status_code == 403
        assert "set OPSLOOP_ADMIN_TOKEN" in response.json()["error"]


async def test_admin_reload_swaps_in_the_new_bundle(
    client: httpx.AsyncClient, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    write_bundle(tiny_bundle, version="2", seed=1)
    response = await client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.json() == {
        "reloaded": True,
        "model_name": "digits",
        "model_version": "2",
        "previous_version": "1",
    }
    infer = await client.post(INFER, json=infer_body(pixels))
    assert infer.json()["model_version"] == "2"
    expected, _ = expected_outputs(weights_of(1), pixels)
    np.testing.assert_allclose(
        np.array(infer.json()["outputs"][0]["data"]).reshape(5, 10), expected, atol=1e-5
    )


async def test_a_broken_bundle_is_refused_and_the_old_model_keeps_serving(
    client: httpx.AsyncClient, tiny_bundle: Path
) -> None:
    (tiny_bundle / "model.onnx").write_bytes(b"corrupted")
    response = await client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 409
    assert "still serving the previous model" in response.json()["error"]
    assert "fails its checksum" in response.json()["error"]
    await assert_still_serving(client)
    assert (await client.get("/v2/health/ready")).status_code == 200


async def test_the_poller_follows_the_bundle_path(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, reload_poll_seconds=0.05))
    async for client in running(app):
        write_bundle(tiny_bundle, version="2", seed=1)
        for _ in range(200):
            response = await client.post(INFER, json=infer_body(pixels))
            assert response.status_code == 200
            if response.json()["model_version"] == "2":
                break
            await asyncio.sleep(0.02)
        assert response.json()["model_version"] == "2"


async def test_requests_in_flight_during_a_swap_all_succeed(
    client: httpx.AsyncClient, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    async def hammer(n: int) -> list[str]:
        versions = []
        for _ in range(n):
            response = await client.post(INFER, json=infer_body(pixels[:1]))
            assert response.status_code == 200
            versions.append(response.json()["model_version"])
        return versions

    async def swap() -> None:
        await asyncio.sleep(0.05)
        write_bundle(tiny_bundle, version="2", seed=1)
        reload = await client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
        assert reload.status_code == 200

    results = await asyncio.gather(*(hammer(40) for _ in range(8)), swap())
    versions = [v for result in results[:-1] for v in result]
    assert set(versions) == {"1", "2"}
    assert versions[-1] == "2"


# --- metrics and the prediction log ------------------------------------------------------------


def metric(text: str, name: str) -> float:
    """The value of one sample, e.g. 'opsloop_batch_size_count' or 'x_total{a="b"}'."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_count_requests_batches_predictions_and_rejections(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    for _ in range(3):
        await client.post(INFER, json=infer_body(pixels))
    await client.post(INFER, content=b"{")
    await client.post("/predict", files={"file": ("d.png", png(), "image/png")})
    text = (await client.get("/metrics")).text
    assert (
        metric(
            text, 'opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="200"}'
        )
        == 3
    )
    assert (
        metric(
            text, 'opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="400"}'
        )
        == 1
    )
    assert metric(text, 'opsloop_requests_total{endpoint="/predict",status="200"}') == 1
    assert (
        metric(
            text,
            'opsloop_rejected_inputs_total{endpoint="/v2/models/{model_name}/infer",reason="malformed_json"}',
        )
        == 1
    )
    assert (
        metric(
            text, 'opsloop_request_latency_seconds_count{endpoint="/v2/models/{model_name}/infer"}'
        )
        == 4
    )
    assert metric(text, "opsloop_batch_size_sum") >= 16  # 3x5 rows + 1 image (+ warm-up free)
    assert metric(text, "opsloop_inference_seconds_count") >= 4
    assert metric(text, "opsloop_prediction_confidence_count") == 16
    assert (
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("opsloop_predictions_total{")
        )
        == 16
    )
    assert metric(text, 'opsloop_model_info{model_name="digits",model_version="1"}') == 1


async def test_every_prediction_is_logged_as_the_model_saw_it(
    app: FastAPI, tmp_path: Path, pixels: npt.NDArray[np.float32]
) -> None:
    async for client in running(app):
        infer = await client.post(INFER, json=infer_body(pixels, id="batch-of-5"))
        upload = await client.post("/predict", files={"file": ("d.png", png(), "image/png")})
    # The lifespan has ended: the log was flushed on shutdown.
    logged = read_predictions(f"sqlite:///{tmp_path / 'predictions.db'}")
    assert logged.request_ids == ["batch-of-5"] * 5 + [upload.json()["request_id"]]
    assert logged.items.tolist() == [0, 1, 2, 3, 4, 0]
    assert logged.endpoints == ["infer"] * 5 + ["predict"]
    assert set(logged.model_versions) == {"1"}
    for item in range(5):
        np.testing.assert_allclose(logged.inputs[item], pixels[item], rtol=1e-6)
    probabilities = np.array(infer.json()["outputs"][0]["data"], np.float32).reshape(5, 10)
    np.testing.assert_allclose(logged.probabilities[:5], probabilities, rtol=1e-6)
    assert logged.labels[:5].tolist() == infer.json()["outputs"][1]["data"]
    assert logged.embeddings.shape == (6, 16)
    assert (logged.latency_ms > 0).all()
    assert logged.inputs[5].shape == (1, 8, 8)
    assert logged.labels[5] == upload.json()["label"]


async def test_the_log_can_be_switched_off(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, predlog_url="none"))
    async for client in running(app):
        assert (await client.post(INFER, json=infer_body(pixels))).status_code == 200
    assert not (tmp_path / "predictions.db").exists()
