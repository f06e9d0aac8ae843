"""Distributed training on the CPU: `opsloop train trainer=ddp trainer.devices=2` (gloo).

Lightning's DDP launcher re-runs the command in a second process, so the test runs the real
console script as a subprocess in a scratch workspace and checks that the two processes trained
one model, in one run directory, tracked as exactly one MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import CONFIG_DIR, prepare_digits

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_cpu_ddp_trains_one_model_into_one_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    processed = tmp_path / "data" / "processed"
    prepare_digits(processed)
    script = Path(sys.executable).with_name("opsloop")
    env = {
        key: value
        for key, value in os.environ.items()
        # A launcher's variables from the surrounding shell would make this a child process.
        if key not in {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "OPSLOOP_RUN_DIR"}
    }
    env |= {"OPSLOOP_CONFIG_DIR": str(CONFIG_DIR), "PYTHONUNBUFFERED": "1"}
    env.pop("OPSLOOP_TRACKING_URI", None)
    done = subprocess.run(
        [
            str(script),
            "train",
            "trainer=ddp",
            "trainer.devices=2",
            "experiment=tiny",
            f"data.processed_dir={processed}",
            # Enough steps for the tiny model to learn: each process sees half the batches.
            "optim.lr=0.02",
            "data.batch_size=32",
            "trainer.max_epochs=3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run id") == 1  # only the launching process reports
    assert "Starting with 2 processes" in done.stderr

    [run_dir] = (tmp_path / "outputs").iterdir()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("opsloop")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in done.stdout
    assert run.data.params["trainer.strategy"] == "ddp"
    assert run.data.params["trainer.devices"] == "2"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert 0.3 < run.data.metrics["test/acc"] <= 1.0  # 10 classes: chance is 0.1
