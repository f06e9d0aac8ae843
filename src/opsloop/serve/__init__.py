"""The inference server: ONNX model bundles over the Open Inference Protocol (KServe V2).

`opsloop serve` runs `create_app(settings)` under uvicorn. The package never imports torch or
Lightning: a bundle (`model.onnx` + `bundle.json`) is all it needs. Configure it with `OPSLOOP_*`
environment variables (see `opsloop.serve.settings.ServeSettings`).
"""

from __future__ import annotations

from opsloop.serve.settings import ServeSettings, get_settings, load_settings

__all__ = ["ServeSettings", "get_settings", "load_settings"]
