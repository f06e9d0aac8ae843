"""Helpers shared by the tests: the repo's real configs, shrunk to write only under tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def log_bundle_predictions(url: str, bundle_dir: Path, images: Any) -> None:
    """Append `images` with the bundle model's outputs to a prediction log, as the server does."""
    import time

    import numpy as np

    from opsloop.bundle import load_bundle, onnx_session, run_onnx
    from opsloop.serve.predlog import LogRecord, prediction_log

    outputs = run_onnx(onnx_session(load_bundle(bundle_dir).model_path), images)
    with prediction_log(url, flush_interval_s=0.01) as log:
        log.append(
            LogRecord(
                request_id=f"r{time.monotonic_ns()}",
                created_at=time.time(),
                endpoint="infer",
                model_name="digits",
                model_version="3",
                inputs=images.astype(np.float32),
                probabilities=outputs["probabilities"],
                embedding=outputs["embedding"],
                latency_ms=1.0,
            )
        )
