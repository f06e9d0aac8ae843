"""Image uploads -> the model's raw-pixel input (the decode step of /predict), without HTTP."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from opsloop.bundle import Preprocessing
from opsloop.serve.image import decode_image, decode_predict_request, extract_upload, parse_invert
from opsloop.serve.protocol import RequestError

DIGITS = {"channels": 1, "height": 8, "width": 8, "pixel_max": 16.0}


def encode(picture: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


def bar(size: tuple[int, int] = (200, 160), ink: int = 255, paper: int = 0) -> Image.Image:
    """A vertical stroke in the middle of the canvas: a crude '1'."""
    canvas = np.full((size[1], size[0]), paper, dtype=np.uint8)
    canvas[:, size[0] * 6 // 16 : size[0] * 10 // 16] = ink
    return Image.fromarray(canvas)


def test_any_size_png_maps_onto_the_models_shape_and_scale() -> None:
    pixels = decode_image(encode(bar()), **DIGITS)
    assert pixels.shape == (1, 1, 8, 8)
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0
    assert 10 < pixels.max() <= 16.0
    # The stroke is in the middle columns, the borders stay black (0).
    assert pixels[0, 0, :, 3:5].mean() > 10
    assert pixels[0, 0, :, 0].max() == 0
    assert pixels[0, 0, :, 7].max() == 0


def test_exact_size_image_keeps_its_values() -> None:
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    pixels = decode_image(encode(Image.fromarray(values)), **DIGITS, invert="false")
    np.testing.assert_allclose(pixels[0, 0], values.astype(np.float64) * 16 / 255, rtol=1e-6)


def test_jpeg_and_rgb_models() -> None:
    colour = Image.fromarray(np.stack([np.asarray(bar())] * 3, axis=-1))
    pixels = decode_image(encode(colour, "JPEG"), channels=3, height=32, width=32, pixel_max=255.0)
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels.max() > 200


def test_dark_ink_on_light_paper_is_inverted_automatically() -> None:
    white_on_black = decode_image(encode(bar()), **DIGITS)
    black_on_white = decode_image(encode(bar(ink=0, paper=255)), **DIGITS)
    np.testing.assert_allclose(black_on_white, white_on_black, atol=1e-4)
    forced = decode_image(encode(bar(ink=0, paper=255)), **DIGITS, invert="false")
    assert forced[0, 0, 0, 0] == pytest.approx(16.0)
    inverted = decode_image(encode(bar()), **DIGITS, invert="true")
    assert inverted[0, 0, 0, 0] == pytest.approx(16.0)


def test_transparent_background_becomes_black() -> None:
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the stroke is opaque
    rgba[:, 18:22, 3] = 255
    pixels = decode_image(encode(Image.fromarray(rgba, "RGBA")), **DIGITS)
    assert pixels[0, 0, :, 0].max() == 0
    assert pixels[0, 0, :, 3:5].mean() > 4


@pytest.mark.parametrize(
    ("data", "reason", "message"),
    [
        (b"", "empty_upload", "empty"),
        (b"hello, not an image", "not_an_image", "not an image"),
        (encode(bar())[:60], "corrupt_image", "truncated or corrupt"),
        (encode(bar(), "TIFF"), "unsupported_format", "TIFF is not accepted"),
    ],
)
def test_bad_uploads_are_rejected_with_a_reason(data: bytes, reason: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        decode_image(data, **DIGITS)
    assert caught.value.status == 400
    assert caught.value.reason == reason


def test_an_image_over_the_pixel_limit_is_413() -> None:
    with pytest.raises(RequestError, match="200x160 pixels is over the 100 pixel limit") as caught:
        decode_image(encode(bar()), **DIGITS, max_pixels=100)
    assert (caught.value.status, caught.value.reason) == (413, "image_too_large")


def test_models_with_other_channel_counts_are_pointed_to_infer() -> None:
    with pytest.raises(RequestError, match="1- or 3-channel"):
        decode_image(encode(bar()), channels=2, height=8, width=8, pixel_max=1.0)


def multipart(
    files: dict[str, tuple[str, bytes, str]], data: dict[str, str] | None = None
) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://test/predict", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_extracts_the_file_field_from_multipart_bytes_exactly() -> None:
    png = encode(bar()) + b"\r\n--boundary-lookalike\r\n\n\r"  # binary that resembles framing
    body, content_type = multipart({"file": ("d.png", png, "image/png")}, {"invert": "auto"})
    assert extract_upload(body, content_type) == png


def test_accepts_a_raw_image_body() -> None:
    png = encode(bar())
    assert extract_upload(png, "image/png") == png


def test_multipart_without_a_file_field_is_rejected() -> None:
    body, content_type = multipart({"image": ("d.png", b"x", "image/png")})
    with pytest.raises(RequestError, match="no 'file' field"):
        extract_upload(body, content_type)


def test_unsupported_content_type_is_415() -> None:
    with pytest.raises(RequestError, match="unsupported content type 'text/plain'") as caught:
        extract_upload(b"hi", "text/plain")
    assert caught.value.status == 415


def test_multipart_without_boundary_is_rejected() -> None:
    with pytest.raises(RequestError, match="could not be parsed"):
        extract_upload(b"garbage", "multipart/form-data")


def test_decodes_a_predict_request_onto_the_bundles_preprocessing() -> None:
    preprocessing = Preprocessing(
        height=8, width=8, channels=1, pixel_max=16.0, mean=[0.0], std=[1.0]
    )
    body, content_type = multipart({"file": ("d.png", encode(bar()), "image/png")})
    pixels = decode_predict_request(body, content_type, preprocessing, "auto")
    np.testing.assert_array_equal(pixels, decode_image(encode(bar()), **DIGITS))
    raw = decode_predict_request(encode(bar()), "image/png", preprocessing, "true")
    np.testing.assert_array_equal(raw, decode_image(encode(bar()), **DIGITS, invert="true"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "auto"), ("AUTO", "auto"), ("true", "true"), ("1", "true"), ("no", "false")],
)
def test_parses_invert(value: str | None, expected: str) -> None:
    assert parse_invert(value) == expected


def test_rejects_an_unknown_invert_value() -> None:
    with pytest.raises(RequestError, match="invert='maybe'"):
        parse_invert("maybe")
