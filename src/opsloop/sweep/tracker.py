"""The sweep's tracking: an MLflow parent run that every trial's training run nests under.

`open_tracker(cfg, study)` returns an `MlflowSweepTracker`, or a `NullSweepTracker` for W&B (a
group id, no parent run) and `logger=none`. Every MLflow call goes through `opsloop.tracking`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import optuna
from optuna.trial import TrialState

from opsloop.config import OpsloopConfig
from opsloop.errors import first_line, redact_url
from opsloop.sweep.study import retry_schema_race, storage_url
from opsloop.tracking import (
    RunStatus,
    check_tracking_reachable,
    connect_tracking_store,
    create_run,
    finish_run,
    log_metrics_to_run,
    log_params_to_run,
    reopen_run,
    resolve_tracking_uri,
    set_run_tags,
)

logger = logging.getLogger(__name__)

# The study's user attribute that lets joining workers find the sweep's MLflow parent run.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
# How long a worker that joined a new study waits for its creator to make the parent run.
PARENT_WAIT_SECONDS = 60.0
PARENT_POLL_SECONDS = 0.5


class SweepTracker(Protocol):
    """The MLflow parent run of a sweep; a null tracker stands in when tracking is off."""

    @property
    def run_id(self) -> str | None: ...

    def mark_trial(self, trial_number: int, state: str, run_id: str | None) -> None: ...

    def finish(self, study: optuna.Study, status: RunStatus) -> None: ...


class NullSweepTracker:
    """Tracks nothing itself; `group` (if any) is passed on to training as the parent id."""

    def __init__(self, group: str | None = None) -> None:
        self.group = group

    @property
    def run_id(self) -> str | None:
        return self.group

    def mark_trial(self, trial_number: int, state: str, run_id: str | None) -> None:
        pass

    def finish(self, study: optuna.Study, status: RunStatus) -> None:
        pass


class MlflowSweepTracker:
    """The sweep's MLflow parent run; each trial's training run becomes its child.

    Workers that join a study share its parent run: its id is kept in the study's user attrs.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self._run_id = run_id

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @classmethod
    def open(
        cls, cfg: OpsloopConfig, study: optuna.Study, *, created: bool = True
    ) -> MlflowSweepTracker:
        """Reopen the study's parent run in this tracking store, or create it.

        `created`: this worker created the study. Workers that joined a new one wait for its
        creator's parent run instead of each making their own.
        """
        workspace = Path(cfg.workspace)
        uri = resolve_tracking_uri(cfg.logger, workspace)
        check_tracking_reachable(uri)
        # Workers started together on a fresh workspace race to create the store's schema.
        retry_schema_race(lambda: connect_tracking_store(uri))
        known = study.user_attrs.get(PARENT_RUN_ATTR)
        if not known and not created:
            known = wait_for_parent_run(study)
        if known:
            tracker = cls(uri, str(known))
            if tracker.reopen():
                return tracker
        run_id = create_run(
            uri,
            workspace,
            experiment=cfg.logger.experiment,
            run_name=cfg.sweep.study_name,
            tags={
                **cfg.logger.tags,
                "opsloop.stage": "sweep",
                "optuna.study_name": cfg.sweep.study_name,
                "optuna.storage": redact_url(storage_url(cfg)),
            },
        )
        log_params_to_run(run_id, uri, search_space_params(cfg))
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return cls(uri, run_id)

    def reopen(self) -> bool:
        """Mark the parent run running again; False when this store does not have it."""
        # False: the study was tracked in another store, so a parent starts here.
        return reopen_run(self._run_id, self.tracking_uri)

    def mark_trial(self, trial_number: int, state: str, run_id: str | None) -> None:
        """Tag a trial's run with its Optuna state; a pruned run ends KILLED, not FAILED."""
        if run_id is None:
            logger.warning("trial %d has no MLflow run to mark %s", trial_number, state)
            return
        with self._best_effort(f"mark trial {trial_number}'s run {run_id} {state}"):
            set_run_tags(run_id, self.tracking_uri, {"optuna.state": state})
            if state == "PRUNED":
                # Stopped on purpose, not broken: training ends a run it cannot finish FAILED.
                finish_run(run_id, self.tracking_uri, "KILLED")

    def finish(self, study: optuna.Study, status: RunStatus) -> None:
        """Log the study's best value, best params and trial counts; end the parent run."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        with self._best_effort(f"finish the parent run {self._run_id}"):
            metrics = {"n_complete": float(len(complete)), "n_pruned": float(len(pruned))}
            if complete:
                metrics["best_value"] = study.best_value
                best = study.best_trial
                tags = {"best_trial": str(best.number)}
                tags.update({f"best.{key}": str(value) for key, value in best.params.items()})
                set_run_tags(self._run_id, self.tracking_uri, tags)
            log_metrics_to_run(self._run_id, self.tracking_uri, metrics)
            finish_run(self._run_id, self.tracking_uri, status)

    @contextlib.contextmanager
    def _best_effort(self, action: str) -> Iterator[None]:
        # Bookkeeping on finished runs must not end a sweep, nor hide the error that ends one.
        try:
            yield
        except Exception as exc:
            logger.warning(
                "could not %s in %s: %s", action, redact_url(self.tracking_uri), first_line(exc)
            )


def wait_for_parent_run(study: optuna.Study) -> str | None:
    """The parent run id the study's creator records, or None if none is coming.

    A study without trials is being set up by its creator, who makes the parent run before its
    first trial; a study with trials but no parent run was tracked elsewhere (or not at all).
    """
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while True:
        known = study.user_attrs.get(PARENT_RUN_ATTR)
        if known:
            return str(known)
        if study.get_trials(deepcopy=False) or time.monotonic() > deadline:
            logger.warning(
                "study %s has no MLflow parent run yet; this worker starts one", study.study_name
            )
            return None
        time.sleep(PARENT_POLL_SECONDS)


def open_tracker(cfg: OpsloopConfig, study: optuna.Study, *, created: bool = True) -> SweepTracker:
    """The sweep's MLflow parent run; a W&B group; or nothing (`logger=none`).

    `created` says whether this worker created the study (see `MlflowSweepTracker.open`).
    """
    if cfg.logger.name == "mlflow":
        return MlflowSweepTracker.open(cfg, study, created=created)
    if cfg.logger.name == "wandb":
        # W&B has no parent runs: training groups runs by the id it is given instead.
        return NullSweepTracker(group=cfg.sweep.study_name)
    return NullSweepTracker()


def search_space_params(cfg: OpsloopConfig) -> dict[str, str]:
    """The sweep's settings and search space as flat MLflow params."""
    params = {
        "sweep.metric": cfg.sweep.metric,
        "sweep.direction": cfg.sweep.direction,
        "sweep.pruner_warmup_epochs": str(cfg.sweep.pruner_warmup_epochs),
    }
    for key, spec in cfg.sweep.params.items():
        if spec.type == "categorical":
            params[f"space.{key}"] = f"categorical{list(spec.choices or [])}"
        else:
            scale = ", log" if spec.log else f", step {spec.step}" if spec.step else ""
            params[f"space.{key}"] = f"{spec.type}[{spec.low}, {spec.high}{scale}]"
    return params
