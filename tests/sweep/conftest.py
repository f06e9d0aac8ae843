"""Fixtures for the sweep tests: a writable copy of the configs, and a prepared tiny experiment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opsloop.config import OpsloopConfig, ParamSpec
from tests.support import CONFIG_DIR, make_config
from tests.sweep.support import with_params

# A small space around the tiny model, so each trial trains in seconds.
TINY_SPACE = {
    "optim__lr": ParamSpec(type="float", low=1e-3, high=3e-2, log=True),
    "model__channels": ParamSpec(type="categorical", choices=[4, 8]),
    "model__dropout": ParamSpec(type="float", low=0.0, high=0.3),
}


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """The repo's configs, copied so a sweep's saved experiment file lands under tmp_path."""
    target = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, target)
    return target


@pytest.fixture
def tiny(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> OpsloopConfig:
    """experiment=tiny with its dataset prepared and the tracking store in the workspace."""
    from opsloop.data import prepare_dataset

    monkeypatch.delenv("OPSLOOP_TRACKING_URI", raising=False)
    cfg = make_config(workspace, f"workspace={workspace}", "experiment=tiny")
    prepare_dataset(cfg.data)
    return with_params(cfg, **TINY_SPACE)
