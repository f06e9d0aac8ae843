"""The drawing pad's Python side: the data URL it hands over, and the framing of the ink."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from opsloop.errors import DataError
from opsloop.ui.sketch import DATA_URL_PREFIX, decode_data_url, frame_drawing


def canvas_png(ink: list[tuple[slice, slice]], size: int = 280, alpha: bool = True) -> bytes:
    """A canvas as the browser exports it: transparent (or black) paper, white strokes."""
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    if not alpha:
        rgba[..., 3] = 255
    for rows, cols in ink:
        rgba[rows, cols] = 255
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def test_a_data_url_round_trips_and_anything_else_is_refused() -> None:
    png = canvas_png([])
    assert decode_data_url(DATA_URL_PREFIX + base64.b64encode(png).decode()) == png
    with pytest.raises(DataError, match="not a PNG data URL"):
        decode_data_url("data:image/jpeg;base64,AAAA")
    with pytest.raises(DataError, match="not valid base64"):
        decode_data_url(DATA_URL_PREFIX + "***")


def test_a_small_digit_in_a_corner_is_framed_square_around_its_ink() -> None:
    # A 20 x 60 stroke near the top-left corner of a 280 x 280 pad.
    framed = frame_drawing(canvas_png([(slice(10, 70), slice(20, 40))]))
    assert framed is not None
    image = np.asarray(Image.open(io.BytesIO(framed)))
    assert image.ndim == 2  # grey, no alpha left for the server to guess about
    side = 60 + 2 * round(60 * 0.12)
    assert image.shape == (side, side)
    rows = np.flatnonzero((image > 128).any(axis=1))
    cols = np.flatnonzero((image > 128).any(axis=0))
    assert (rows[0], side - 1 - rows[-1]) == (round(60 * 0.12), round(60 * 0.12))
    assert abs(cols[0] - (side - 1 - cols[-1])) <= 1  # centred across as well
    assert (image == 0).mean() > 0.5  # the paper stays black


def test_an_opaque_canvas_is_read_the_same_way() -> None:
    framed = frame_drawing(canvas_png([(slice(100, 200), slice(130, 150))], alpha=False))
    assert framed is not None
    assert Image.open(io.BytesIO(framed)).size == (124, 124)


def test_an_empty_pad_is_none_and_garbage_is_a_data_error() -> None:
    assert frame_drawing(canvas_png([])) is None
    with pytest.raises(DataError, match="not a readable PNG"):
        frame_drawing(b"not a png")
