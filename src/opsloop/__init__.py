"""opsloop: the ML -> DEV -> OPS loop around your model code.

Versioned data, tracked training, a gated model registry, ONNX bundles served over the Open
Inference Protocol, and drift monitoring that closes the loop. Run `opsloop --help` to start.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("opsloop")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
