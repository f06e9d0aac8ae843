"""Hyperparameter sweeps: an Optuna study over config paths, one tracked training run per trial.

Run `opsloop sweep --n-trials 20 [overrides]`, or `run_sweep(load_config([...]))`: TPE samples
`sweep.params` (config paths such as `optim.lr`), a median pruner stops weak trials, workers
sharing `sweep.storage` join one study, and the best trial becomes an experiment config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from opsloop.config import OpsloopConfig, find_config_dir, load_config
from opsloop.errors import ConfigError, OpsloopError, redact_url
from opsloop.sweep.best import save_best
from opsloop.sweep.objective import Objective, TrainFn
from opsloop.sweep.space import validate_sweep
from opsloop.sweep.study import create_or_join_study, open_storage, storage_url
from opsloop.sweep.tracker import open_tracker
from opsloop.tracking import RunStatus

__all__ = ["SweepResult", "TrainFn", "run_sweep"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """A study after this worker's trials: its best trial and where the results went.

    Trial counts cover the whole study, including trials of other workers sharing its storage.
    """

    study_name: str
    storage: str  # the storage URL, password hidden
    metric: str
    direction: str
    best_value: float
    best_trial: int
    best_params: dict[str, Any]  # config path -> value
    n_complete: int
    n_pruned: int
    best_config_path: Path
    trials_csv: Path
    parent_run_id: str | None
    seconds: float


def run_sweep(
    cfg: OpsloopConfig,
    *,
    n_trials: int | None = None,
    config_dir: str | Path | None = None,
    train_fn: TrainFn | None = None,
) -> SweepResult:
    """Run `n_trials` trials (default `sweep.n_trials`) of the study and save its best config.

    Workers that share `sweep.storage` join one study, each running its own `n_trials`.
    `config_dir` is where `experiment/sweep_<study>.yaml` goes (default: the config dir in use);
    `train_fn` trains one trial (default `opsloop.train.train_model`).
    """
    started = time.perf_counter()
    propagate_optuna_logs()
    validate_sweep(cfg)
    trials = cfg.sweep.n_trials if n_trials is None else n_trials
    if trials < 1:
        raise ConfigError(f"n_trials={trials} must be at least 1")
    # Found (and the defaults composed) now: a missing config dir must not surface after hours.
    directory = find_config_dir(config_dir)
    baseline = load_config([], config_dir=directory)
    if train_fn is None:
        from opsloop.train import train_model

        train_fn = train_model
    url = storage_url(cfg)
    study, created = create_or_join_study(cfg, open_storage(url))
    tracker = open_tracker(cfg, study, created=created)
    logger.info(
        "study %s (%s %s) in %s: running %d trials, %d already in it",
        cfg.sweep.study_name,
        cfg.sweep.direction,
        cfg.sweep.metric,
        redact_url(url),
        trials,
        len(study.trials),
    )
    status: RunStatus = "FAILED"
    try:
        study.optimize(
            Objective(cfg, train_fn, tracker),
            n_trials=trials,
            timeout=cfg.sweep.timeout_seconds,
        )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(study, status)
    return summarize(cfg, study, baseline, directory, tracker.run_id, url, started)


def propagate_optuna_logs() -> None:
    """One log format: Optuna's per-trial lines go to the application's handlers, not its own."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def summarize(
    cfg: OpsloopConfig,
    study: optuna.Study,
    baseline: OpsloopConfig,
    config_dir: Path,
    parent_run_id: str | None,
    url: str,
    started: float,
) -> SweepResult:
    """Save the study's best trial and its trials table; the result the CLI prints."""
    counts = dict.fromkeys(TrialState, 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    if counts[TrialState.COMPLETE] == 0:
        raise OpsloopError(
            f"study '{cfg.sweep.study_name}' has no completed trial yet "
            f"({counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed); "
            "run more trials or raise sweep.pruner_warmup_epochs"
        )
    best = study.best_trial
    config_path, trials_csv = save_best(cfg, study, baseline, config_dir)
    logger.info(
        "best of %d complete trials: trial %d, %s=%.6g, %s",
        counts[TrialState.COMPLETE],
        best.number,
        cfg.sweep.metric,
        study.best_value,
        ", ".join(f"{k}={v}" for k, v in best.params.items()),
    )
    return SweepResult(
        study_name=cfg.sweep.study_name,
        storage=redact_url(url),
        metric=cfg.sweep.metric,
        direction=cfg.sweep.direction,
        best_value=study.best_value,
        best_trial=best.number,
        best_params=dict(best.params),
        n_complete=counts[TrialState.COMPLETE],
        n_pruned=counts[TrialState.PRUNED],
        best_config_path=config_path,
        trials_csv=trials_csv,
        parent_run_id=parent_run_id,
        seconds=time.perf_counter() - started,
    )
