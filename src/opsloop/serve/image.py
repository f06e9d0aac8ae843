"""Image files for `POST /predict`: the upload's bytes -> the model's raw-pixel input.

Any size of PNG, JPEG, BMP, GIF or WebP is decoded with Pillow, flattened onto black where it is
transparent, converted to the bundle's channels (grayscale or RGB), resized to the bundle's
height x width (bilinear, antialiased) and mapped from 0..255 onto 0..pixel_max. Normalisation is
inside the ONNX graph, so nothing else happens here.

The digit datasets are white ink on a black background (MNIST's convention: ink is the high
value). Photos and scans are usually dark ink on light paper, so `invert="auto"` inverts an image
whose border is mostly light; `"true"`/`"false"` force the choice.
"""

from __future__ import annotations

import io
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
MAX_IMAGE_PIXELS = 40_000_000
UPLOAD_FIELD = "file"
Invert = Literal["auto", "true", "false"]


def decode_predict_request(
    body: bytes, content_type: str, preprocessing: Preprocessing, invert: Invert = "auto"
) -> npt.NDArray[np.float32]:
    """A `/predict` body (multipart form or raw image) as the model's (1, C, H, W) input."""
    return decode_image(
        extract_upload(body, content_type),
        channels=preprocessing.channels,
        height=preprocessing.height,
        width=preprocessing.width,
        pixel_max=preprocessing.pixel_max,
        invert=invert,
    )


def decode_image(
    data: bytes,
    *,
    channels: int,
    height: int,
    width: int,
    pixel_max: float,
    invert: Invert = "auto",
) -> npt.NDArray[np.float32]:
    """An image file as a (1, channels, height, width) float32 array on 0..pixel_max."""
    if channels not in (1, 3):
        raise RequestError(
            f"/predict handles 1- or 3-channel models, this one takes {channels} channels; "
            "send tensors to /v2/models/{name}/infer instead",
            reason="unsupported_channels",
        )
    image = open_image(data)
    image = flatten_alpha(image).convert("L" if channels == 1 else "RGB")
    if should_invert(image, invert):
        image = ImageOps.invert(image)
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32).reshape(height, width, channels)
    scaled = pixels.transpose(2, 0, 1) * np.float32(pixel_max / 255.0)
    return scaled[np.newaxis].astype(np.float32, copy=False)


def open_image(data: bytes) -> Image.Image:
    """Decode the whole file, or a 400 saying it is not a (complete) image."""
    if not data:
        raise RequestError("the upload is empty; send a PNG or JPEG file", reason="empty_upload")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(
            "the upload is not an image Pillow can read; send a PNG or JPEG file",
            reason="not_an_image",
        ) from None
    if image.format not in ALLOWED_FORMATS:
        raise RequestError(
            f"image format {image.format} is not accepted; send PNG, JPEG, BMP, GIF or WebP",
            reason="unsupported_format",
        )
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise RequestError(
            f"image of {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS} pixel "
            "limit; downscale it first",
            status=413,
            reason="image_too_large",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(
            f"the {image.format} file is truncated or corrupt ({exc}); send the whole file",
            reason="corrupt_image",
        ) from None
    return image


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
