"""One trial: its config, the pruning callback, its value, and a pruned trial's record.

The callback is driven with stand-in trainers (no training); whole sweeps use `FakeTrain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pytest
from optuna.trial import TrialState

from opsloop.config import OpsloopConfig
from opsloop.errors import ConfigError
from opsloop.sweep import run_sweep
from opsloop.sweep.objective import PruningCallback, trial_config, trial_value
from opsloop.sweep.study import storage_url
from tests.sweep.support import (
    FakeResult,
    FakeTrain,
    fake_trainer,
    study_with_history,
    sweep_config,
)


def test_a_trial_config_keeps_no_storage_password(workspace: Path) -> None:
    url = "postgresql://optuna:s3cret@db.example/studies"
    cfg = sweep_config(workspace, f"sweep.storage={url}", "sweep.study_name=pw")
    trial_cfg = trial_config(cfg, 4, {"optim.lr": 0.002})
    assert "s3cret" not in str(trial_cfg.sweep.storage)
    assert trial_cfg.optim.lr == 0.002
    assert trial_cfg.logger.run_name == "pw-trial-4"
    assert trial_cfg.logger.tags["optuna.param.optim.lr"] == "0.002"
    assert cfg.sweep.storage == url  # the sweep's own config is unchanged


def test_the_pruning_callback_prunes_a_lagging_trial_after_warmup() -> None:
    study = study_with_history(warmup=1)
    trial = study.ask()
    callback = PruningCallback(trial, "val/loss")
    module = L.LightningModule()
    # The sanity check's number is ignored: not reported, not part of the best value.
    callback.on_validation_end(fake_trainer(0, {"val/loss": 0.01}, sanity=True), module)
    # Epoch 0 is worse than every peer, but within the warm-up: it must not be pruned.
    callback.on_validation_end(fake_trainer(0, {"val/loss": 2.0}), module)
    with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 1: val/loss=1\.5"):
        callback.on_validation_end(fake_trainer(1, {"val/loss": 1.5}), module)
    assert callback.pruned_epoch == 1
    assert callback.history == {0: 2.0, 1: 1.5}
    assert callback.best == 1.5
    frozen = study.trials[-1]
    assert frozen.intermediate_values == {0: 2.0, 1: 1.5}


def test_the_pruning_callback_lets_a_leading_trial_run_and_keeps_its_best() -> None:
    # The peers reached accuracies of 0.3, 0.5, 0.6 at epoch 0; this trial leads at every epoch.
    study = study_with_history(warmup=0, direction="maximize", finals=(0.7, 0.9, 1.0))
    callback = PruningCallback(study.ask(), "val/acc", maximize=True)
    module = L.LightningModule()
    for epoch, acc in enumerate((0.8, 0.95, 0.9)):
        callback.on_validation_end(fake_trainer(epoch, {"val/acc": acc}), module)
    assert callback.pruned_epoch is None
    assert callback.history == {0: 0.8, 1: 0.95, 2: 0.9}
    assert callback.best == 0.95  # the best epoch's value, not the last one's


def test_a_missing_metric_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    callback = PruningCallback(study_with_history(warmup=0).ask(), "val/f2")
    callback.on_validation_end(fake_trainer(0, {"val/loss": 0.3}), L.LightningModule())
    assert callback.best is None
    assert "metric 'val/f2' was not logged this epoch; logged: val/loss" in caplog.text


def test_a_trial_never_reported_takes_the_best_value_training_reports() -> None:
    callback = PruningCallback(study_with_history(warmup=0).ask(), "val/loss")
    assert trial_value(callback, {"val/loss": 0.5, "val/loss_best": 0.3}, "val/loss") == 0.3
    assert trial_value(callback, {"val/loss": 0.5}, "val/loss") == 0.5


def test_a_metric_training_never_logs_is_named(workspace: Path, config_copy: Path) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=1", "sweep.metric=val/f2")
    with pytest.raises(ConfigError, match=r"sweep\.metric='val/f2' was not logged.*val/loss"):
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    study = optuna.load_study(study_name="opsloop", storage=storage_url(cfg))
    assert [t.state for t in study.trials] == [TrialState.FAIL]


class WrappingTrain(FakeTrain):
    """Training that wraps every failure in its own error, as a real stage may."""

    def __call__(self, cfg: OpsloopConfig, **kwargs: Any) -> FakeResult:
        try:
            return super().__call__(cfg, **kwargs)
        except optuna.TrialPruned as exc:
            raise RuntimeError("training stopped by a callback") from exc


def test_a_pruned_trial_is_marked_pruned_even_when_training_wraps_the_error(
    workspace: Path, config_copy: Path
) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=5", "sweep.study_name=wrapped")
    result = run_sweep(cfg, n_trials=12, config_dir=config_copy, train_fn=WrappingTrain())
    study = optuna.load_study(study_name="wrapped", storage=result.storage)
    states = {trial.state for trial in study.trials}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED}
    assert result.n_pruned >= 1
