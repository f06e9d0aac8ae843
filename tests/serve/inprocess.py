"""The serving app in process (httpx over ASGI): its settings, a running client, request bodies."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from fastapi import FastAPI
from PIL import Image

from opsloop.serve.settings import ServeSettings, load_settings

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


def metric(text: str, name: str) -> float:
    """The value of one sample, e.g. 'opsloop_batch_size_count' or 'x_total{a="b"}'."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
