"""Three `opsloop sweep` workers started at the same moment join one study on PostgreSQL.

Each worker is a real process with its own `--n-trials`; they share the Optuna storage (a
PostgreSQL database) and the MLflow tracking server (PostgreSQL + S3). Afterwards the study holds
exactly the trials asked for, numbered uniquely, each finished or pruned; one best config was
saved, naming the study's best trial; and MLflow holds one parent run whose children are exactly
the trials, each ended as its trial did. The storage password appears nowhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.integration.conftest import NO_TELEMETRY, MlflowServer
from tests.integration.postgres import PASSWORD
from tests.integration.processes import OPSLOOP
from tests.support import CONFIG_DIR, prepare_digits

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

WORKERS = 3
TRIALS_PER_WORKER = 3
# A small space around the tiny model, so each trial trains in seconds.
SWEEP_FILE = """\
study_name: workers
n_trials: 3
metric: val/loss
direction: minimize
pruner_warmup_epochs: 0
params:
  optim.lr: {type: float, low: 0.001, high: 0.03, log: true}
  model.channels: {type: categorical, choices: [4, 8]}
"""


def test_concurrent_workers_share_one_study_and_one_parent_run(
    postgres_url: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    study_name = f"workers-{uuid.uuid4().hex[:8]}"
    configs = tmp_path / "configs"  # a copy: the best config is written into it
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "sweep" / "workers.yaml").write_text(SWEEP_FILE)
    processed = tmp_path / "processed"
    prepare_digits(processed)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= NO_TELEMETRY | {
        "OPSLOOP_CONFIG_DIR": str(configs),
        "OPSLOOP_TRACKING_URI": mlflow_server.url,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    workers = []
    for index in range(WORKERS):
        workspace = tmp_path / f"worker{index}"  # as on separate machines: nothing shared locally
        workspace.mkdir()
        command = [
            *OPSLOOP, "sweep", "--n-trials", str(TRIALS_PER_WORKER),
            "experiment=tiny", "sweep=workers",
            f"sweep.study_name={study_name}",
            f"sweep.storage={postgres_url}",
            f"sweep.sampler_seed={index}",  # workers started together sample apart
            f"workspace={workspace}",
            f"data.processed_dir={processed}",
            f"logger.experiment={study_name}",
            "logger.log_model=false",
            "trainer.max_epochs=2",
        ]  # fmt: skip
        log = (tmp_path / f"worker{index}.log").open("w")
        workers.append(
            (subprocess.Popen(command, cwd=workspace, env=env, stdout=log, stderr=log), log)
        )
    started = time.monotonic()
    try:
        for process, _ in workers:
            process.wait(timeout=600)
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()  # by PID: only the workers this test started
                process.wait()
            log.close()
    outputs = [(tmp_path / f"worker{index}.log").read_text() for index in range(WORKERS)]
    for (process, _), output in zip(workers, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert PASSWORD not in output
        assert "opsloop:***@127.0.0.1" in output  # the storage, shown redacted
    print(f"{WORKERS} workers x {TRIALS_PER_WORKER} trials: {time.monotonic() - started:.0f}s")

    # The study: exactly the trials asked for, uniquely numbered, each finished or pruned.
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(WORKERS * TRIALS_PER_WORKER))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    best = study.best_trial

    # One best config, naming the study's final best trial, that loads as that trial.
    saved = sorted((configs / "experiment").glob("sweep_*.yaml"))
    assert [path.name for path in saved] == [f"sweep_{study_name}.yaml"]
    text = saved[0].read_text()
    assert f"The best trial ({best.number}) of the Optuna study '{study_name}'" in text
    assert f"out of {len(trials) - count(trials, TrialState.PRUNED)} complete trials" in text
    body = yaml.safe_load(text)
    assert body["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
    assert body["model"]["channels"] == best.params["model.channels"]
    assert PASSWORD not in text

    # MLflow: one parent run; its children are exactly the trials, ended as the trials ended.
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("opsloop.stage") == "sweep"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert PASSWORD not in str(parent.data.tags) + str(parent.data.params)
    assert parent.data.tags["optuna.storage"].startswith("postgresql+psycopg://opsloop:***@")
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert len(by_trial) == len(children) == len(trials)
    for trial in trials:
        run = by_trial[trial.number]
        expected = "FINISHED" if trial.state == TrialState.COMPLETE else "KILLED"
        assert (run.info.status, run.data.tags["optuna.state"]) == (expected, trial.state.name)
        assert PASSWORD not in str(run.data.params)
    assert parent.data.metrics["n_complete"] + parent.data.metrics["n_pruned"] == len(trials)
    assert parent.data.tags["best_trial"] == str(best.number)


def count(trials: list[optuna.trial.FrozenTrial], state: TrialState) -> int:
    return sum(1 for trial in trials if trial.state == state)


def test_of_workers_started_together_exactly_one_creates_the_study(postgres_url: str) -> None:
    """The storage's unique study name elects the one worker that sets the study up."""
    from opsloop.config import load_config
    from opsloop.sweep.study import create_or_join_study, open_storage

    cfg = load_config(["sweep.study_name=elected", f"sweep.storage={postgres_url}"])
    barrier = threading.Barrier(6)

    def worker(_: int) -> bool:
        storage = open_storage(postgres_url)
        barrier.wait()
        return create_or_join_study(cfg, storage)[1]

    with ThreadPoolExecutor(max_workers=6) as pool:
        created = list(pool.map(worker, range(6)))
    assert created.count(True) == 1
    assert optuna.get_all_study_names(postgres_url) == ["elected"]
