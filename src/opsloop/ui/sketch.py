"""The drawing pad: draw a digit with the mouse (or a finger) and send it to `/predict`.

A tiny Streamlit component (`st.components.v2`, inline HTML and JavaScript, nothing fetched from
the network): a black canvas, white ink, a Clear and a Classify button. Classify hands the canvas
to Python as a PNG data URL; `frame_drawing` then crops it to the ink, as a scanner frames a
form, because the digits a model learns from fill their frame and a small digit drawn in a corner
would be a different world. The server does the rest (resize, pixel scale) as for any upload.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
from typing import Any

import numpy as np
from PIL import Image

from opsloop.errors import DataError

PAD_PIXELS = 280
INK_THRESHOLD = 32  # grey level above which a pixel is ink (antialiasing leaves faint edges)
MARGIN = 0.12  # of the digit's longer side, added around it
DATA_URL_PREFIX = "data:image/png;base64,"

HTML = f"""
<div class="opsloop-sketch">
  <canvas class="opsloop-sketch-pad" width="{PAD_PIXELS}" height="{PAD_PIXELS}"></canvas>
  <div class="opsloop-sketch-buttons">
    <button type="button" class="opsloop-sketch-clear">Clear</button>
    <button type="button" class="opsloop-sketch-send">Classify drawing</button>
  </div>
</div>
"""
CSS = """
.opsloop-sketch-pad { background: #000; border-radius: 6px; touch-action: none; cursor: crosshair;
  width: 280px; height: 280px; display: block; }
.opsloop-sketch-buttons { margin-top: 0.5rem; display: flex; gap: 0.5rem; }
.opsloop-sketch-buttons button { font: inherit; padding: 0.3rem 0.9rem; border-radius: 6px;
  border: 1px solid var(--st-border-color, #ccc); background: transparent; color: inherit;
  cursor: pointer; }
"""
# Re-run on every mount: listeners are (re)bound to the canvas that is there, and removed again
# by the returned cleanup, so a rerun never doubles them nor wipes the drawing.
JS = """
export default function (component) {
  const { parentElement, setTriggerValue } = component;
  const canvas = parentElement.querySelector(".opsloop-sketch-pad");
  const clear = parentElement.querySelector(".opsloop-sketch-clear");
  const send = parentElement.querySelector(".opsloop-sketch-send");
  const context = canvas.getContext("2d");
  context.lineWidth = 22;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.strokeStyle = "#fff";
  let drawing = false;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [
      (event.clientX - box.left) * (canvas.width / box.width),
      (event.clientY - box.top) * (canvas.height / box.height),
    ];
  };
  const down = (event) => {
    drawing = true;
    canvas.setPointerCapture?.(event.pointerId);
    const [x, y] = at(event);
    context.beginPath();
    context.moveTo(x, y);
    context.lineTo(x + 0.1, y + 0.1);
    context.stroke();
  };
  const move = (event) => {
    if (!drawing) return;
    const [x, y] = at(event);
    context.lineTo(x, y);
    context.stroke();
  };
  const up = () => { drawing = false; };
  const wipe = () => { context.clearRect(0, 0, canvas.width, canvas.height); };
  const submit = () => { setTriggerValue("png", canvas.toDataURL("image/png")); };
  canvas.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  window.addEventListener("pointerup", up);
  clear.addEventListener("click", wipe);
  send.addEventListener("click", submit);
  return () => {
    canvas.removeEventListener("pointerdown", down);
    canvas.removeEventListener("pointermove", move);
    window.removeEventListener("pointerup", up);
    clear.removeEventListener("click", wipe);
    send.removeEventListener("click", submit);
  };
}
"""


@functools.cache
def _component() -> Any:
    """Registered once per process (registering again would only replace it, with a warning)."""
    import streamlit as st

    return st.components.v2.component(
        "opsloop_sketch", html=HTML, css=CSS, js=JS, isolate_styles=False
    )


def draw_pad(key: str = "sketch") -> str | None:
    """Show the pad; the PNG data URL of the drawing in the run where Classify was pressed."""
    result = _component()(key=key, on_png_change=lambda: None)
    value = result.get("png") if result is not None else None
    return value if isinstance(value, str) else None


def decode_data_url(url: str) -> bytes:
    """The PNG bytes of a `data:image/png;base64,...` URL, or a DataError saying what it was."""
    if not url.startswith(DATA_URL_PREFIX):
        raise DataError(f"the drawing is not a PNG data URL (it starts {url[:30]!r}); draw again")
    try:
        return base64.b64decode(url[len(DATA_URL_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"the drawing's data URL is not valid base64 ({exc}); draw again") from exc


def frame_drawing(png: bytes) -> bytes | None:
    """The drawing cropped to a square around its ink (plus a margin), as PNG; None if empty."""
    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except (OSError, ValueError) as exc:
        raise DataError(f"the drawing is not a readable PNG ({exc}); draw again") from exc
    grey = np.asarray(flatten(image), dtype=np.uint8)
    rows = np.flatnonzero((grey > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((grey > INK_THRESHOLD).any(axis=0))
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(bottom - top, right - left)
    side += 2 * round(side * MARGIN)
    centre_y, centre_x = (top + bottom) // 2, (left + right) // 2
    box = (centre_x - side // 2, centre_y - side // 2)
    framed = Image.new("L", (side, side), 0)  # outside the pad is paper too: black
    framed.paste(Image.fromarray(grey), (-box[0], -box[1]))
    out = io.BytesIO()
    framed.save(out, format="PNG")
    return out.getvalue()


def flatten(image: Image.Image) -> Image.Image:
    """Grey levels, with transparent pixels (the canvas before any ink) as black paper."""
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(paper, rgba).convert("L")
    return image.convert("L")
