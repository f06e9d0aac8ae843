"""One trial: train the trial's config, report each validation epoch, return its best value.

`Objective` is what `study.optimize` calls; `PruningCallback` lets the study's pruner stop a
trial that lags its peers, and records the trial's value (its best epoch's).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import optuna

from opsloop.config import OpsloopConfig
from opsloop.errors import ConfigError, redact_url
from opsloop.sweep.space import apply_params, suggest_params

if TYPE_CHECKING:
    from opsloop.sweep.tracker import SweepTracker
    from opsloop.train import TrainResult

logger = logging.getLogger(__name__)


class TrainFn(Protocol):
    """The signature of `opsloop.train.train_model`, which every trial calls."""

    def __call__(
        self,
        cfg: OpsloopConfig,
        *,
        callbacks: Sequence[L.Callback] = (),
        parent_run_id: str | None = None,
    ) -> TrainResult: ...


class Objective:
    """Trains one trial's config and returns its best validation value."""

    def __init__(self, cfg: OpsloopConfig, train_fn: TrainFn, tracker: SweepTracker) -> None:
        self.cfg = cfg
        self.train_fn = train_fn
        self.tracker = tracker

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest_params(trial, self.cfg.sweep.params)
        trial_cfg = trial_config(self.cfg, trial.number, values)
        callback = PruningCallback(
            trial, self.cfg.sweep.metric, maximize=self.cfg.sweep.direction == "maximize"
        )
        try:
            result = self.train_fn(
                trial_cfg, callbacks=[callback], parent_run_id=self.tracker.run_id
            )
        except Exception as exc:
            # Training may wrap the callback's TrialPruned in an error of its own: the
            # callback's record, not the exception's type, says whether the trial was pruned.
            if callback.pruned_reason is None:
                raise
            self.tracker.mark_trial(trial.number, "PRUNED", callback.run_id)
            raise optuna.TrialPruned(callback.pruned_reason) from exc
        trial.set_user_attr("run_dir", str(result.run_dir))
        if result.run_id is not None:
            trial.set_user_attr("run_id", result.run_id)
        self.tracker.mark_trial(trial.number, "COMPLETE", result.run_id)
        return trial_value(callback, result.metrics, self.cfg.sweep.metric)


class PruningCallback(L.Callback):
    """Reports a validation metric to an Optuna trial after every validation epoch.

    Raises `optuna.TrialPruned` (which stops training) when the study's pruner says the trial is
    doing worse than its peers. Keeps the metric's history: a trial's value is its best epoch's.
    """

    def __init__(self, trial: optuna.Trial, monitor: str, *, maximize: bool = False) -> None:
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.maximize = maximize
        self.history: dict[int, float] = {}
        self.pruned_epoch: int | None = None
        self.pruned_reason: str | None = None
        self.run_id: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's MLflow logger knows the trial's run id; a pruned trial ends in an
        # exception, not a TrainResult, so this is the only place to learn it from.
        run_id = getattr(trainer.logger, "run_id", None)
        self.run_id = str(run_id) if run_id else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The sanity check runs two batches of an untrained model: reporting it would let the
        # pruner judge (and the best value include) a number that says nothing about the trial.
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logger.warning(
                "trial %d: metric '%s' was not logged this epoch; logged: %s",
                self.trial.number,
                self.monitor,
                ", ".join(sorted(trainer.callback_metrics)) or "nothing",
            )
            return
        epoch = int(trainer.current_epoch)
        score = float(value)
        self.history[epoch] = score
        self.trial.report(score, step=epoch)
        if self.trial.should_prune():
            self.pruned_epoch = epoch
            self.pruned_reason = (
                f"trial {self.trial.number} pruned at epoch {epoch}: {self.monitor}={score:.4g}"
            )
            raise optuna.TrialPruned(self.pruned_reason)

    @property
    def best(self) -> float | None:
        """The best value seen (ignoring NaN), or None when nothing was reported."""
        finite = [v for v in self.history.values() if not math.isnan(v)]
        if not finite:
            return math.nan if self.history else None
        return max(finite) if self.maximize else min(finite)


def trial_value(callback: PruningCallback, metrics: Mapping[str, float], metric: str) -> float:
    """The best epoch's value the callback saw, else what training reports as the best or final."""
    if callback.best is not None:
        return callback.best
    for key in (f"{metric}_best", metric):
        if key in metrics:
            return float(metrics[key])
    raise ConfigError(
        f"sweep.metric='{metric}' was not logged by training; use one of: "
        f"{', '.join(sorted(metrics)) or 'none was logged'}"
    )


def trial_config(cfg: OpsloopConfig, number: int, values: Mapping[str, Any]) -> OpsloopConfig:
    """The sweep's config with one trial's values, its run named and tagged after the trial."""
    trial_cfg = apply_params(cfg, values)
    tags = {
        **trial_cfg.logger.tags,
        "optuna.study_name": cfg.sweep.study_name,
        "optuna.trial_number": str(number),
        **{f"optuna.param.{key}": str(value) for key, value in values.items()},
    }
    run_name = f"{cfg.sweep.study_name}-trial-{number}"
    # Training logs and saves its whole config: a storage password must not go with it.
    storage = redact_url(cfg.sweep.storage) if cfg.sweep.storage else None
    return dataclasses.replace(
        trial_cfg,
        logger=dataclasses.replace(trial_cfg.logger, run_name=run_name, tags=tags),
        sweep=dataclasses.replace(trial_cfg.sweep, storage=storage),
    )
