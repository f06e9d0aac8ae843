"""Fixtures for the serving tests: tiny real bundles, sample inputs and the app in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from fastapi import FastAPI

from opsloop.serve.app import create_app
from tests.serve.inprocess import make_settings, running
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


@pytest.fixture
def app(tmp_path: Path, tiny_bundle: Path) -> FastAPI:
    """The serving app over `tiny_bundle`, logging to `tmp_path`, with the admin token set."""
    return create_app(make_settings(tmp_path, tiny_bundle))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` with its lifespan running (the model loaded)."""
    async for c in running(app):
        yield c
