"""Helpers shared by the tests: the repo's real configs, shrunk to write only under tmp_path."""

from __future__ import annotations

from pathlib import Path

from opsloop.config import OpsloopConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def make_config(workspace: Path, *overrides: str) -> OpsloopConfig:
    """The real composed config with every output redirected into `workspace`."""
    return load_config(
        [
            f"data.processed_dir={workspace / 'processed'}",
            f"data.cache_dir={workspace / 'raw'}",
            *overrides,
        ],
        config_dir=CONFIG_DIR,
    )
