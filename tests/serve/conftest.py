"""Fixtures for the serving tests: tiny real bundles and sample inputs (no torch, milliseconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.serve.onnx_bundles import write_bundle


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """Version "1" of a tiny 1x8x8 -> 10-class model."""
    return write_bundle(tmp_path / "bundle", version="1", seed=0)


@pytest.fixture
def pixels() -> npt.NDArray[np.float32]:
    """Five seeded examples on the digits' 0..16 scale."""
    rng = np.random.default_rng(7)
    return (rng.random((5, 1, 8, 8)) * 16).astype(np.float32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
