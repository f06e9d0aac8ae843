"""Image files for `POST /predict`: the upload's bytes -> the model's raw-pixel input.

Any size of PNG, JPEG, BMP, GIF or WebP is decoded with Pillow, flattened onto black where it is
transparent, converted to the bundle's channels (grayscale or RGB), resized to the bundle's
height x width (bilinear, antialiased) and mapped from 0..255 onto 0..pixel_max. Normalisation is
inside the ONNX graph, so nothing else happens here.

The digit datasets are white ink on a black background (MNIST's convention: ink is the high
value). Photos and scans are usually dark ink on light paper, so `invert="auto"` inverts an image
whose border is mostly light; `"true"`/`"false"` force the choice.

Decoding takes CPU time proportional to the image's pixels, so the server runs it on a small
thread pool of its own (`decode_predict_request_async`), never on the event loop, after the
pixel count has been checked from the file's header.
"""

from __future__ import annotations

import asyncio
import functools
import io
from concurrent.futures import ThreadPoolExecutor
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from opsloop.bundle import Preprocessing
from opsloop.serve.protocol import RequestError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "WEBP"})
# Decoded size bound: a small compressed file can expand into gigabytes (a decompression bomb).
# Checked per call from the header, so it holds whatever Pillow's global limit is set to.
MAX_IMAGE_PIXELS = 40_000_000
# A form carries one file; a body of thousands of parts costs seconds to parse for nothing.
MAX_FORM_PARTS = 16
# Threads that decode uploads, per worker process: few, because each large image holds up to
# a few hundred MB while it is decoded and the CPU is shared with inference anyway.
DECODE_THREADS = 2
UPLOAD_FIELD = "file"
Invert = Literal["auto", "true", "false"]


def decode_predict_request(
    body: bytes,
    content_type: str,
    preprocessing: Preprocessing,
    invert: Invert = "auto",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> npt.NDArray[np.float32]:
    """A `/predict` body (multipart form or raw image) as the model's (1, C, H, W) input."""
    return decode_image(
        extract_upload(body, content_type),
        channels=preprocessing.channels,
        height=preprocessing.height,
        width=preprocessing.width,
        pixel_max=preprocessing.pixel_max,
        invert=invert,
        max_pixels=max_pixels,
    )


async def decode_predict_request_async(
    body: bytes,
    content_type: str,
    preprocessing: Preprocessing,
    invert: Invert = "auto",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> npt.NDArray[np.float32]:
    """`decode_predict_request` on the decoder threads, so other requests keep being answered."""
    call = functools.partial(
        decode_predict_request, body, content_type, preprocessing, invert, max_pixels
    )
    return await asyncio.get_running_loop().run_in_executor(decoder_pool(), call)


@functools.cache
def decoder_pool() -> ThreadPoolExecutor:
    """The process's image-decoding threads (started on first use, not at import)."""
    return ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="opsloop-decode")


def decode_image(
    data: bytes,
    *,
    channels: int,
    height: int,
    width: int,
    pixel_max: float,
    invert: Invert = "auto",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> npt.NDArray[np.float32]:
    """An image file as a (1, channels, height, width) float32 array on 0..pixel_max."""
    if channels not in (1, 3):
        raise RequestError(
            f"/predict handles 1- or 3-channel models, this one takes {channels} channels; "
            "send tensors to /v2/models/{name}/infer instead",
            reason="unsupported_channels",
        )
    image = open_image(data, max_pixels)
    image = flatten_alpha(image).convert("L" if channels == 1 else "RGB")
    if should_invert(image, invert):
        image = ImageOps.invert(image)
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32).reshape(height, width, channels)
    scaled = pixels.transpose(2, 0, 1) * np.float32(pixel_max / 255.0)
    return scaled[np.newaxis].astype(np.float32, copy=False)


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode the whole file, or a 4xx saying it is not a (complete, small enough) image.

    `Image.open` reads only the header, so the pixel count is checked before anything is
    decoded. Pillow's own bomb check (its global `Image.MAX_IMAGE_PIXELS`) may fire first, on
    open, for a far larger image: that is the same 413.
    """
    if not data:
        raise RequestError("the upload is empty; send a PNG or JPEG file", reason="empty_upload")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_many_pixels("the image", max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(
            "the upload is not an image Pillow can read; send a PNG or JPEG file",
            reason="not_an_image",
        ) from None
    if image.format not in ALLOWED_FORMATS:
        raise RequestError(
            f"image format {image.format} is not accepted; send PNG, JPEG, BMP, GIF or WebP",
            reason="unsupported_format",
        )
    if image.width * image.height > max_pixels:
        raise too_many_pixels(f"image of {image.width}x{image.height} pixels", max_pixels)
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_many_pixels("a frame of the image", max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError(
            f"the {image.format} file is truncated or corrupt ({exc}); send the whole file",
            reason="corrupt_image",
        ) from None
    return image


def too_many_pixels(what: str, max_pixels: int) -> RequestError:
    return RequestError(
        f"{what} is over the {max_pixels} pixel limit (OPSLOOP_MAX_IMAGE_PIXELS); downscale it "
        "first",
        status=413,
        reason="image_too_large",
    )


def flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become black background (the datasets' background is 0)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return image
    background = Image.new("RGBA", image.size, (0, 0, 0, 255))
    background.alpha_composite(image.convert("RGBA"))
    return background


def should_invert(image: Image.Image, invert: Invert) -> bool:
    """Invert when asked, or (auto) when the border is light, i.e. dark ink on light paper."""
    if invert != "auto":
        return invert == "true"
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(border.mean()) > 127.5


def parse_invert(value: str | None) -> Invert:
    """The `invert` query parameter: auto (default), true or false."""
    choice = (value or "auto").lower()
    if choice == "auto":
        return "auto"
    if choice in ("true", "1", "yes"):
        return "true"
    if choice in ("false", "0", "no"):
        return "false"
    raise RequestError(f"invert={value!r} is not one of auto, true, false", reason="bad_parameter")


def extract_upload(body: bytes, content_type: str) -> bytes:
    """The image bytes of a multipart/form-data upload (field `file`) or of a raw image body.

    Multipart is parsed with the standard library's email parser, so the base install needs
    no extra package for form uploads.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return multipart_file(body, content_type)
    if media.startswith("image/") or media == "application/octet-stream":
        return body
    raise RequestError(
        f"unsupported content type {media or 'none'!r}; upload the image as multipart/form-data "
        f"field '{UPLOAD_FIELD}' (curl -F {UPLOAD_FIELD}=@digit.png) or as an image/* body",
        status=415,
        reason="unsupported_media_type",
    )


def multipart_file(body: bytes, content_type: str) -> bytes:
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    check_form_parts(body, BytesParser(policy=policy.HTTP).parsebytes(head).get_boundary())
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise RequestError(
            "the multipart/form-data body could not be parsed (missing boundary?)",
            reason="bad_multipart",
        )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == UPLOAD_FIELD:
            payload = part.get_payload(decode=True)
            return payload if isinstance(payload, bytes) else b""
    raise RequestError(
        f"the form has no '{UPLOAD_FIELD}' field; send the image as -F {UPLOAD_FIELD}=@digit.png",
        reason="missing_file",
    )


def check_form_parts(body: bytes, boundary: str | None) -> None:
    """413 before parsing a form of more than MAX_FORM_PARTS parts (counted by delimiter)."""
    if not boundary:
        return  # the full parse says what is wrong
    parts = body.count(b"--" + boundary.encode("latin-1", "replace")) - 1
    if parts > MAX_FORM_PARTS:
        raise RequestError(
            f"the form has {parts} parts, over the limit of {MAX_FORM_PARTS}; send one "
            f"'{UPLOAD_FIELD}' field",
            status=413,
            reason="too_many_parts",
        )
