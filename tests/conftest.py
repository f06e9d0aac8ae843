"""Shared fixtures; every output a test writes goes under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from opsloop.config import DataConfig
from opsloop.data import prepare_dataset
from tests.support import CONFIG_DIR, make_config

if TYPE_CHECKING:
    from opsloop.export import ExportResult

# Tools the tests drive must never phone home from a hermetic test run.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny models on a small, shared CPU: one torch thread is many times faster than several
# contending ones (measured in docs/training.md). Set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataConfig]:
    """A small CNN trained for a few epochs on digits, saved as a Lightning checkpoint."""
    from opsloop.train import fit_checkpoint

    workspace = tmp_path_factory.mktemp("export")
    data = make_config(workspace).data
    prepare_dataset(data)
    return fit_checkpoint(data, workspace / "model.ckpt"), data


@pytest.fixture(scope="session")
def bundle(
    trained: tuple[Path, DataConfig], tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    from opsloop.export import export_bundle

    checkpoint, data = trained
    out = tmp_path_factory.mktemp("bundles") / "digits"
    return export_bundle(
        checkpoint,
        data,
        out,
        model_name="digits",
        model_version="3",
        lineage={"run_id": "abc123", "git_commit": "deadbeef", "seed": 42},
        metrics={"test/acc": 0.97},
        evaluation={"per_class": [{"class": "0", "recall": 1.0}], "robustness": []},
        quantize=True,
    )
