"""The FastAPI routes in process: health, metadata, /predict, admin auth and reload."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from fastapi import FastAPI

from opsloop.serve.app import create_app
from opsloop.serve.state import AppState, get_state
from tests.serve.inprocess import (
    INFER,
    TOKEN,
    assert_still_serving,
    infer_body,
    make_settings,
    png,
    running,
)
from tests.serve.onnx_bundles import expected_outputs, weights_of, write_bundle

pytestmark = pytest.mark.anyio


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


async def test_routes_take_the_state_as_a_dependency_tests_can_swap(app: FastAPI) -> None:
    """No lifespan, no model: a stand-in state alone decides what the readiness probe answers."""
    manager = SimpleNamespace(current=None, last_error="no bundle at /nowhere")

    def stand_in() -> AppState:
        return cast(AppState, SimpleNamespace(manager=manager))

    app.dependency_overrides[get_state] = stand_in
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.get("/v2/health/ready")
        assert response.status_code == 503
        assert response.json() == {
            "ready": False,
            "error": "model not loaded yet: no bundle at /nowhere",
        }
        manager.current = object()  # the real state has no model: only the stand-in says 200
        response = await client.get("/v2/health/ready")
        assert (response.status_code, response.json()) == (200, {"ready": True})


# --- /predict -----------------------------------------------------------------------------------


async def test_predict_classifies_an_uploaded_image(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", files={"file": ("digit.png", png(), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "1"
    assert response.headers["x-model-version"] == "1"
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", body["request_id"])  # 96 random bits
    assert set(body["probabilities"]) == {str(i) for i in range(10)}
    assert body["class_name"] == str(body["label"])
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    raw = await client.post("/predict", content=png(), headers={"content-type": "image/png"})
    assert raw.json()["label"] == body["label"]


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
