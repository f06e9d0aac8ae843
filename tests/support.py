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


def prepare_digits(processed_dir: Path) -> Path:
    """Prepare the digits dataset into `processed_dir` (once per module is plenty)."""
    from opsloop.data import prepare_dataset

    return prepare_dataset(
        load_config([f"data.processed_dir={processed_dir}"], config_dir=CONFIG_DIR).data
    ).path


def tiny_train_config(workspace: Path, processed_dir: Path, *overrides: str) -> OpsloopConfig:
    """`experiment=tiny` on prepared digits: runs, checkpoints and the MLflow store in `workspace`.

    Logging the MLflow model is off unless a test asks for it (it costs seconds).
    """
    return make_config(
        workspace,
        "experiment=tiny",
        f"workspace={workspace}",
        f"data.processed_dir={processed_dir}",
        "logger.log_model=false",
        *overrides,
    )
