"""Shared fixtures; every output a test writes goes under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opsloop.config import DataConfig
from tests.support import CONFIG_DIR, make_config

# Tools the tests drive must never phone home from a hermetic test run.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def config_dir() -> Path:
    return CONFIG_DIR


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A scratch directory for every output a test writes."""
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def digits_cfg(workspace: Path) -> DataConfig:
    return make_config(workspace).data
