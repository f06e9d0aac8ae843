"""The sweep's tracking: a parent run in a real SQLite MLflow store, one child run per trial."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from opsloop.config import OpsloopConfig, ParamSpec
from opsloop.sweep import run_sweep
from opsloop.sweep.study import storage_url
from opsloop.sweep.tracker import (
    PARENT_RUN_ATTR,
    MlflowSweepTracker,
    NullSweepTracker,
    open_tracker,
    search_space_params,
)
from tests.sweep.support import sweep_config, with_logger, with_params


@pytest.fixture
def tracked(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> OpsloopConfig:
    """A sweep config tracked in the workspace's own MLflow store."""
    monkeypatch.delenv("OPSLOOP_TRACKING_URI", raising=False)
    return with_logger(sweep_config(workspace), "mlflow", "parent")


def test_the_search_space_is_logged_as_flat_params(workspace: Path) -> None:
    cfg = with_params(
        sweep_config(workspace),
        optim__lr=ParamSpec(low=1e-4, high=1e-2, log=True),
        model__depth=ParamSpec(type="int", low=1, high=3, step=1),
        model__channels=ParamSpec(type="categorical", choices=[8, 16]),
    )
    assert search_space_params(cfg) == {
        "sweep.metric": "val/loss",
        "sweep.direction": "minimize",
        "sweep.pruner_warmup_epochs": str(cfg.sweep.pruner_warmup_epochs),
        "space.optim.lr": "float[0.0001, 0.01, log]",
        "space.model.depth": "int[1, 3, step 1]",
        "space.model.channels": "categorical[8, 16]",
    }


def test_untracked_sweeps_get_a_null_tracker_that_names_the_wandb_group(workspace: Path) -> None:
    study = optuna.create_study()
    untracked = open_tracker(sweep_config(workspace), study)
    assert isinstance(untracked, NullSweepTracker)
    assert untracked.run_id is None
    wandb = open_tracker(with_logger(sweep_config(workspace), "wandb", "grouped"), study)
    assert isinstance(wandb, NullSweepTracker)
    assert wandb.run_id == "grouped"  # training groups the trials' W&B runs by it
    assert not (workspace / "mlflow.db").exists()


def test_a_joining_worker_reopens_the_parent_run_and_another_store_starts_its_own(
    tracked: OpsloopConfig, workspace: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    study = optuna.create_study()
    first = MlflowSweepTracker.open(tracked, study)
    assert study.user_attrs[PARENT_RUN_ATTR] == first.run_id
    first.finish(study, "FINISHED")
    client = MlflowClient(first.tracking_uri)
    assert client.get_run(str(first.run_id)).info.status == "FINISHED"

    joined = MlflowSweepTracker.open(tracked, study)
    assert joined.run_id == first.run_id
    parent = client.get_run(str(first.run_id))
    assert parent.info.status == "RUNNING"
    assert parent.info.run_name == "parent"
    assert parent.data.tags["opsloop.stage"] == "sweep"
    assert parent.data.tags["optuna.storage"] == storage_url(tracked)
    assert parent.data.params["space.model.channels"] == "categorical[16, 32, 64]"

    elsewhere = tmp_path / "elsewhere"
    moved = dataclasses.replace(tracked, workspace=str(elsewhere))
    fresh = MlflowSweepTracker.open(moved, study)
    assert fresh.run_id != first.run_id
    assert study.user_attrs[PARENT_RUN_ATTR] == fresh.run_id
    assert (elsewhere / "mlflow.db").is_file()


def test_marking_a_trial_is_best_effort(
    tracked: OpsloopConfig, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = MlflowSweepTracker.open(tracked, optuna.create_study())
    tracker.mark_trial(3, "COMPLETE", None)
    assert "trial 3 has no MLflow run to mark COMPLETE" in caplog.text
    tracker.mark_trial(4, "PRUNED", "no-such-run")  # logged, not raised: the sweep goes on
    assert "could not mark trial 4's run no-such-run PRUNED" in caplog.text


# --- real sweeps: tiny training runs ------------------------------------------------------------


@pytest.mark.slow
def test_a_tracked_sweep_nests_one_child_run_per_trial_under_its_parent(
    tiny: OpsloopConfig, workspace: Path, config_copy: Path
) -> None:
    from mlflow import MlflowClient

    result = run_sweep(with_logger(tiny, "mlflow", "tracked"), n_trials=3, config_dir=config_copy)

    client = MlflowClient(f"sqlite:///{workspace.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(tiny.logger.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert len(runs) == 4
    parent = parents[0]
    assert parent.info.run_name == "tracked"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(result.best_value)
    assert parent.data.metrics["n_complete"] == 3
    assert parent.data.params["space.model.channels"] == "categorical[4, 8]"
    assert parent.data.tags["best_trial"] == str(result.best_trial)
    for key, value in result.best_params.items():
        assert parent.data.tags[f"best.{key}"] == str(value)

    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1", "2"]
    study = optuna.load_study(study_name="tracked", storage=result.storage)
    for child in children:
        trial = study.trials[int(child.data.tags["optuna.trial_number"])]
        assert child.info.status == "FINISHED"
        assert child.info.run_name == f"tracked-trial-{trial.number}"
        assert child.data.tags["optuna.state"] == "COMPLETE"
        assert child.data.tags["optuna.param.optim.lr"] == str(trial.params["optim.lr"])
        assert trial.user_attrs["run_id"] == child.info.run_id
        assert child.data.metrics["val/loss_best"] == pytest.approx(trial.value)


@pytest.mark.slow
def test_a_real_trial_behind_its_peers_is_pruned_and_its_run_killed(
    tiny: OpsloopConfig, workspace: Path, config_copy: Path
) -> None:
    from mlflow import MlflowClient

    cfg = with_logger(tiny, "mlflow", "pruned")
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, pruner_warmup_epochs=0))
    # Five finished trials that reached a (made-up) val/loss of 0.01 at every epoch: any real
    # trial is behind their median at its first epoch.
    study = optuna.create_study(study_name="pruned", storage=storage_url(cfg))
    lr = optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)
    for _ in range(5):
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": 0.003},
                distributions={"optim.lr": lr},
                value=0.01,
                intermediate_values={0: 0.01, 1: 0.01},
            )
        )
    result = run_sweep(cfg, n_trials=1, config_dir=config_copy)

    assert (result.n_complete, result.n_pruned) == (5, 1)
    trial = optuna.load_study(study_name="pruned", storage=result.storage).trials[-1]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # stopped after its first validation epoch
    client = MlflowClient(f"sqlite:///{workspace.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(cfg.logger.experiment)
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`optuna.trial_number` = '5'"
    )
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED"
