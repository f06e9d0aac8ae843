"""Hostile input in process: every case answers 4xx with a one-line reason, and serving goes on.

The cases an attacker's battery found (issue 12): non-string output names, decompression bombs,
a form of 60k parts, oversized request ids, batches over the row limit, bodies of other content
types and cross-origin posts. The cases that need a real socket (huge headers, slow clients, the
event loop during a large decode) are in `tests/integration/test_serve_limits.py`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from opsloop.errors import ConfigError
from opsloop.predictions import MAX_REQUEST_ID
from opsloop.serve.app import create_app
from opsloop.serve.image import MAX_FORM_PARTS
from tests.serve.inprocess import INFER, assert_still_serving, infer_body, make_settings, running

pytestmark = pytest.mark.anyio

ONE = np.ones((1, 1, 8, 8), np.float32)
EVIL = "https://evil.example"
FRIEND = "https://app.example"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rows: int = 64) -> bytes:
    """A grayscale PNG whose header claims width x height; only its first rows are compressed
    (the header is all a decoder needs to be tempted to allocate the whole image)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """A GIF of a few dozen bytes with a 65535 x 65535 logical screen and one 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00"
    frame = b"," + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def many_parts(count: int) -> tuple[bytes, str]:
    """A multipart/form-data body of `count` tiny fields (and no file)."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\n1\r\n'
    return part * count + b"--b--\r\n", "multipart/form-data; boundary=b"


@pytest.fixture
async def roomy(tmp_path: Path, tiny_bundle: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app with an 8 MB payload limit, so large bodies reach the checks behind it."""
    app = create_app(make_settings(tmp_path, tiny_bundle, max_payload_bytes=8 * 1024 * 1024))
    async for client in running(app):
        yield client


async def assert_refused(
    response: httpx.Response, status: int, message: str, client: httpx.AsyncClient
) -> None:
    """`status` with a one-line `{"error": ...}` naming `message`; then the server still serves."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error
    assert "\n" not in error
    await assert_still_serving(client)


# --- infer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [["label"], {"label": 1}, 7, None, True])
async def test_an_output_name_that_is_not_a_string_is_400(
    client: httpx.AsyncClient, name: Any
) -> None:
    response = await client.post(INFER, json=infer_body(ONE, outputs=[{"name": name}]))
    await assert_refused(response, 400, "unknown output", client)


async def test_a_request_id_over_the_limit_is_400(roomy: httpx.AsyncClient) -> None:
    longest = await roomy.post(INFER, json=infer_body(ONE, id="i" * MAX_REQUEST_ID))
    assert longest.json()["id"] == "i" * MAX_REQUEST_ID
    for length in (MAX_REQUEST_ID + 1, 300_000):  # the was a 295 KB request
        response = await roomy.post(INFER, json=infer_body(ONE, id="i" * length))
        await assert_refused(response, 400, f"over the limit of {MAX_REQUEST_ID}", roomy)


async def test_a_batch_over_the_row_limit_is_413(tmp_path: Path, tiny_bundle: Path) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, max_request_rows=4))
    async for client in running(app):
        response = await client.post(INFER, json=infer_body(np.ones((5, 1, 8, 8), np.float32)))
        await assert_refused(response, 413, "exceeds the limit of 4", client)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_infer_refuses_the_body_types_a_web_page_can_post_freely(
    client: httpx.AsyncClient, content_type: str
) -> None:
    body = httpx.Request("POST", "http://t", json=infer_body(ONE)).read()
    response = await client.post(INFER, content=body, headers={"content-type": content_type})
    await assert_refused(response, 415, "send application/json or application/octet-stream", client)


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8"])
async def test_infer_takes_json_with_or_without_a_content_type(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    body = httpx.Request("POST", "http://t", json=infer_body(ONE)).read()
    # Raw bytes: httpx adds no content type, as Triton's client sends none.
    headers = {"content-type": content_type} if content_type else {}
    request = client.build_request("POST", INFER, content=body, headers=headers)
    assert request.headers.get("content-type") == content_type
    assert (await client.send(request)).status_code == 200


# --- /predict -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "size"),
    [(png_bomb(20_000, 20_000), "the image"), (gif_bomb(), "the image")],
    ids=["png-20000x20000", "gif-65535x65535-screen"],
)
async def test_decompression_bombs_are_413_naming_the_limit(
    client: httpx.AsyncClient, image: bytes, size: str
) -> None:
    assert len(image) < 64 * 1024
    response = await client.post("/predict", files={"file": ("bomb", image)})
    await assert_refused(response, 413, "over the 40000000 pixel limit", client)
    raw = await client.post("/predict", content=image, headers={"content-type": "image/png"})
    await assert_refused(raw, 413, "OPSLOOP_MAX_IMAGE_PIXELS", client)


async def test_the_pixel_limit_is_checked_per_call_whatever_pillows_global_is(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some library switched Pillow's off
    app = create_app(make_settings(tmp_path, tiny_bundle, max_image_pixels=10_000))
    async for client in running(app):
        response = await client.post("/predict", files={"file": ("b.png", png_bomb(200, 100))})
        await assert_refused(response, 413, "200x100 pixels is over the 10000 pixel limit", client)
        small = await client.post("/predict", files={"file": ("s.png", png_bomb(64, 64))})
        assert small.status_code == 200


async def test_a_form_of_60k_parts_is_refused_before_it_is_parsed(
    roomy: httpx.AsyncClient,
) -> None:
    body, content_type = many_parts(60_000)
    assert len(body) > 3_000_000
    response = await roomy.post("/predict", content=body, headers={"content-type": content_type})
    await assert_refused(response, 413, f"60000 parts, over the limit of {MAX_FORM_PARTS}", roomy)


async def test_a_form_with_a_few_extra_fields_still_works(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/predict",
        files={"file": ("d.png", png_bomb(32, 32))},
        data={"note": "hello", "source": "phone"},
    )
    assert response.status_code == 200


# --- cross-origin posts ------------------------------------------------------------------------


async def test_a_foreign_pages_posts_are_refused_without_an_allowlist(
    client: httpx.AsyncClient,
) -> None:
    origin = {"origin": EVIL}
    infer = await client.post(INFER, json=infer_body(ONE), headers=origin)
    await assert_refused(infer, 403, "OPSLOOP_CORS_ORIGINS", client)
    assert "access-control-allow-origin" not in infer.headers
    upload = await client.post(
        "/predict", files={"file": ("d.png", png_bomb(32, 32))}, headers=origin
    )
    await assert_refused(upload, 403, f"cross-origin request from '{EVIL}' refused", client)
    label = {"request_id": "r", "label": 1}
    feedback = await client.post("/feedback", json=label, headers=origin)
    await assert_refused(feedback, 403, "cross-origin", client)
    preflight = await client.options(
        INFER, headers={**origin, "access-control-request-method": "POST"}
    )
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in preflight.headers


async def test_the_servers_own_origin_may_post(client: httpx.AsyncClient) -> None:
    # /docs "try it out": the page is served by the server itself (httpx's host is "test").
    same = await client.post(INFER, json=infer_body(ONE), headers={"origin": "http://test"})
    assert same.status_code == 200


async def test_listed_origins_get_cors_headers_and_others_still_403(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, cors_origins=f"{FRIEND}/, {FRIEND}:8443"))
    async for client in running(app):
        preflight = await client.options(
            INFER,
            headers={
                "origin": FRIEND,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == FRIEND
        answered = await client.post(INFER, json=infer_body(ONE), headers={"origin": FRIEND})
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == FRIEND
        assert "x-model-version" in answered.headers["access-control-expose-headers"]
        refused = await client.post(INFER, json=infer_body(ONE), headers={"origin": EVIL})
        await assert_refused(refused, 403, "cross-origin", client)


def test_a_bad_cors_origin_setting_fails_start_up(tmp_path: Path, tiny_bundle: Path) -> None:
    with pytest.raises(ConfigError, match=r"OPSLOOP_CORS_ORIGINS=.*not an origin"):
        make_settings(tmp_path, tiny_bundle, cors_origins="app.example/path")


# --- /feedback ----------------------------------------------------------------------------------


async def test_feedback_takes_only_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/feedback",
        content=b'{"request_id": "r", "label": 1}',
        headers={"content-type": "text/plain"},
    )
    await assert_refused(response, 415, "send application/json", client)


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No case may reach the 500 handler (which logs 'request failed' / 'infer failed')."""
    yield
    failed = [r for r in caplog.records if r.getMessage() in ("request failed", "infer failed")]
    assert failed == []
