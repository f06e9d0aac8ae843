"""Hyperparameter sweeps: an Optuna study over config paths, one tracked training run per trial.

Run `opsloop sweep --n-trials 20 [overrides]`, or `run_sweep(load_config([...]))`. TPE samples
`sweep.params` (keys are config paths such as `optim.lr`), a median pruner stops weak trials early,
and every worker sharing `sweep.storage` joins one study. The best trial is saved as
`configs/experiment/sweep_<study>.yaml`, so `opsloop train experiment=sweep_<study>` reproduces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import lightning as L
import optuna
from optuna.trial import TrialState

from opsloop.atomic import write_text_atomically
from opsloop.config import (
    OpsloopConfig,
    ParamSpec,
    find_config_dir,
    load_config,
    validate_config,
)
from opsloop.errors import ConfigError, OpsloopError, TrackingError

if TYPE_CHECKING:
    from opsloop.train import TrainResult

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

PARAM_TYPES = ("float", "int", "categorical")
# Study names become file names (`sweep_<study>.yaml`) and Hydra option names.
_STUDY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Where a run happens rather than what it is: left out of the saved best config.
_ENVIRONMENT_KEYS = (
    "workspace",
    "output_dir",
    "ckpt_path",
    "logger",
    "sweep",
    "data.processed_dir",
    "data.cache_dir",
)
# A worker that dies without a word leaves its trial RUNNING; its missing heartbeat fails it.
HEARTBEAT_SECONDS = 60
SQLITE_TIMEOUT_SECONDS = 60
SCHEMA_ATTEMPTS = 3
SCHEMA_RETRY_SECONDS = 1.0
MEDIAN_PRUNER_STARTUP_TRIALS = 5
# The study's user attribute that lets joining workers find the sweep's MLflow parent run.
PARENT_RUN_ATTR = "mlflow_parent_run_id"


class TrainFn(Protocol):
    """The signature of `opsloop.train.train_model`, which every trial calls."""

    def __call__(
        self,
        cfg: OpsloopConfig,
        *,
        callbacks: Sequence[L.Callback] = (),
        parent_run_id: str | None = None,
    ) -> TrainResult: ...


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
    study = open_study(cfg, open_storage(url))
    tracker = open_tracker(cfg, study)
    logger.info(
        "study %s (%s %s) in %s: running %d trials, %d already in it",
        cfg.sweep.study_name,
        cfg.sweep.direction,
        cfg.sweep.metric,
        display_url(url),
        trials,
        len(study.trials),
    )
    status = "FAILED"
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
        storage=display_url(url),
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


def save_best(
    cfg: OpsloopConfig, study: optuna.Study, baseline: OpsloopConfig, config_dir: Path
) -> tuple[Path, Path]:
    """Write the best trial as an experiment config, and the trials table; return both paths.

    A copy of the config and `trials.csv` go to `<workspace>/<output_dir>/sweeps/<study>/`; the
    experiment file goes to `<config_dir>/experiment/`, or only to the copy when that is read-only.
    """
    name = cfg.sweep.study_name
    best = study.best_trial
    delta = best_config_delta(apply_params(cfg, best.params), baseline, best.params)
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    text = render_experiment(
        delta,
        study_name=name,
        header=[
            f"The best trial ({best.number}) of the Optuna study '{name}': "
            f"{cfg.sweep.metric}={study.best_value:.6g} ({cfg.sweep.direction}),",
            f"out of {complete} complete trials. Written by `opsloop sweep`; holds what differs",
            "from configs/config.yaml's defaults, plus the tuned parameters.",
        ],
    )
    out_dir = Path(cfg.workspace) / cfg.output_dir / "sweeps" / name
    filename = f"sweep_{name}.yaml"
    write_text_atomically(out_dir / filename, text)
    trials_csv = out_dir / "trials.csv"
    write_text_atomically(trials_csv, study.trials_dataframe().to_csv(index=False))
    target = config_dir / "experiment" / filename
    try:
        write_text_atomically(target, text)
    except OSError as exc:
        logger.warning(
            "cannot write %s (%s); the best config is at %s", target, exc, out_dir / filename
        )
        target = out_dir / filename
    return target, trials_csv


# --- the search space ---------------------------------------------------------------------------


def validate_sweep(cfg: OpsloopConfig) -> None:
    """Check the sweep settings and every search-space entry before any trial runs."""
    sweep = cfg.sweep
    if not _STUDY_NAME.match(sweep.study_name):
        raise ConfigError(
            f"sweep.study_name='{sweep.study_name}' is not usable as a file name; "
            "use letters, digits, '_' and '-' only"
        )
    if sweep.n_trials < 1:
        raise ConfigError(f"sweep.n_trials={sweep.n_trials} must be at least 1")
    if sweep.timeout_seconds is not None and sweep.timeout_seconds <= 0:
        raise ConfigError(f"sweep.timeout_seconds={sweep.timeout_seconds} must be positive")
    if sweep.pruner_warmup_epochs < 0:
        raise ConfigError(f"sweep.pruner_warmup_epochs={sweep.pruner_warmup_epochs} must be >= 0")
    if not sweep.params:
        raise ConfigError(
            "sweep.params is empty; add a search space such as "
            "`optim.lr: {type: float, low: 0.0003, high: 0.01, log: true}` to configs/sweep/"
        )
    _check_single_process(cfg)
    for key, spec in sweep.params.items():
        check_param_path(cfg, key)
        check_param_spec(key, spec)
        _check_values_fit(cfg, key, spec)


def check_param_path(cfg: OpsloopConfig, key: str) -> None:
    """Fail unless `key` (e.g. `optim.lr`) names one value of the typed config."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth]) or "the config root"
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise ConfigError(
                f"sweep.params.{key}: '{part}' is not a key of {section}; "
                f"use one of: {', '.join(names)}"
            )
        node = getattr(node, part)
        if depth + 1 < len(parts) and not dataclasses.is_dataclass(node):
            raise ConfigError(
                f"sweep.params.{key}: {'.'.join(parts[: depth + 1])} is a value, not a section"
            )
    if dataclasses.is_dataclass(node):
        raise ConfigError(
            f"sweep.params.{key}: {key} is a section, not a value; name a key inside it "
            f"such as {key}.{dataclasses.fields(node)[0].name}"
        )
    if parts[0] == "sweep":
        raise ConfigError(f"sweep.params.{key}: the sweep's own settings cannot be swept")


def check_param_spec(key: str, spec: ParamSpec) -> None:
    """Fail with a one-line `ConfigError` naming `key` unless Optuna can sample `spec`."""
    where = f"sweep.params.{key}"
    if spec.type not in PARAM_TYPES:
        raise ConfigError(
            f"{where}: type '{spec.type}' is unknown; use one of: float, int, categorical"
        )
    if spec.type == "categorical":
        if spec.low is not None or spec.high is not None or spec.step is not None or spec.log:
            raise ConfigError(f"{where}: a categorical takes only `choices`, not low/high/step/log")
        if not spec.choices:
            raise ConfigError(f"{where}: a categorical needs a non-empty `choices` list")
        for choice in spec.choices:
            if choice is not None and not isinstance(choice, str | int | float | bool):
                raise ConfigError(
                    f"{where}: choice {choice!r} is not a number, string, bool or null"
                )
        return
    if spec.choices is not None:
        raise ConfigError(f"{where}: `choices` belongs to type categorical, not {spec.type}")
    if spec.low is None or spec.high is None:
        raise ConfigError(f"{where}: a {spec.type} range needs both `low` and `high`")
    if spec.low >= spec.high:
        raise ConfigError(f"{where}: low={spec.low} must be below high={spec.high}")
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, not {spec.low}")
    if spec.log and spec.step is not None:
        raise ConfigError(f"{where}: `step` and `log: true` cannot be combined")
    if spec.step is not None and spec.step <= 0:
        raise ConfigError(f"{where}: step={spec.step} must be positive")
    if spec.type == "int":
        for name in ("low", "high", "step"):
            value = getattr(spec, name)
            if value is not None and not float(value).is_integer():
                raise ConfigError(f"{where}: an int range needs a whole {name}, not {value}")


def _check_values_fit(cfg: OpsloopConfig, key: str, spec: ParamSpec) -> None:
    """Apply the range's ends (or every choice) now, so a bad bound fails before any trial."""
    for value in _extreme_values(spec):
        try:
            apply_params(cfg, {key: value})
        except ConfigError as exc:
            raise ConfigError(
                f"sweep.params.{key}: the value {value!r} is not valid there ({exc}); "
                "change the range or the choices"
            ) from exc


def _extreme_values(spec: ParamSpec) -> list[Any]:
    if spec.type == "categorical":
        return list(spec.choices or [])
    low, high = float(spec.low or 0.0), float(spec.high or 0.0)
    if spec.type == "int":
        return [int(low), int(high)]
    return [low, high]


def _check_single_process(cfg: OpsloopConfig) -> None:
    """A trial is one process: DDP would re-launch the whole sweep in every rank."""
    trainer = cfg.trainer
    devices = trainer.devices.strip()
    several = (devices.isdigit() and int(devices) > 1) or "," in devices
    all_gpus = devices in ("auto", "-1") and trainer.accelerator != "cpu"
    if "ddp" in trainer.strategy or trainer.num_nodes > 1 or several or all_gpus:
        raise ConfigError(
            f"a sweep trains each trial in one process, but trainer.strategy={trainer.strategy} "
            f"devices={trainer.devices} num_nodes={trainer.num_nodes}; use one device and run "
            "more sweep workers in parallel instead"
        )


def suggest_params(trial: optuna.Trial, params: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Sample one value per config path; Optuna records each under the config path's name."""
    values: dict[str, Any] = {}
    for key, spec in params.items():
        if spec.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(spec.choices or []))
        elif spec.type == "int":
            step = int(spec.step) if spec.step is not None else 1
            values[key] = trial.suggest_int(
                key, int(spec.low or 0), int(spec.high or 0), step=step, log=spec.log
            )
        else:
            values[key] = trial.suggest_float(
                key, float(spec.low or 0.0), float(spec.high or 0.0), step=spec.step, log=spec.log
            )
    return values


def apply_params(cfg: OpsloopConfig, values: Mapping[str, Any]) -> OpsloopConfig:
    """A validated copy of `cfg` with config-path values applied (`cfg` itself is unchanged).

    The values go through OmegaConf's structured config, so they are type-checked and converted
    exactly as a command-line override would be (an int for a float field becomes a float).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf = OmegaConf.structured(cfg)
    for key, value in values.items():
        check_param_path(cfg, key)
        try:
            OmegaConf.update(conf, key, value, merge=False)
        except OmegaConfBaseException as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{key}={value!r} does not fit the config: {first_line}") from exc
    typed = OmegaConf.to_object(conf)
    if not isinstance(typed, OpsloopConfig):
        raise AssertionError(f"OmegaConf returned {type(typed).__name__}, not OpsloopConfig")
    validate_config(typed)
    return typed


# --- pruning ------------------------------------------------------------------------------------


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


# --- storage and study --------------------------------------------------------------------------


def storage_url(cfg: OpsloopConfig) -> str:
    """`sweep.storage`, or the embedded `sqlite:///<absolute workspace>/optuna.db`."""
    if cfg.sweep.storage:
        return cfg.sweep.storage
    workspace = Path(cfg.workspace).expanduser().resolve()
    return f"sqlite:///{workspace / 'optuna.db'}"


def display_url(url: str) -> str:
    """The storage URL with any password hidden, fit for logs and printing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage that many processes and machines can share."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Parallel workers on one machine write to one file: wait for its lock, don't fail.
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    try:
        return retry_schema_race(lambda: _rdb_storage(url, engine_kwargs))
    except Exception as exc:  # sqlalchemy's and the DB driver's errors vary by backend
        raise OpsloopError(
            f"cannot open the sweep storage {display_url(url)}: {_first_line(exc)}; "
            "check sweep.storage (an SQLAlchemy URL such as postgresql://user@host/db)"
        ) from exc


def retry_schema_race(open_fn: Callable[[], _T]) -> _T:
    """`open_fn()`, tried again after a pause if it fails; the last failure is raised.

    Workers started together race to create a new database's schema ("table ... already
    exists", an Alembic version already moved on); the loser finds it complete on a retry.
    """
    for attempt in range(1, SCHEMA_ATTEMPTS):
        try:
            return open_fn()
        except Exception as exc:
            logger.debug("attempt %d failed, retrying: %s", attempt, _first_line(exc))
            time.sleep(SCHEMA_RETRY_SECONDS * attempt)
    return open_fn()


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        # Heartbeats are "experimental" since Optuna 2.9 and stable in use; one warning per
        # worker start would only be noise.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS
        )


def open_study(cfg: OpsloopConfig, storage: optuna.storages.RDBStorage) -> optuna.Study:
    """Create the study, or join it when another worker already made it."""
    sweep = cfg.sweep
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.study_name,
        direction="maximize" if sweep.direction == "maximize" else "minimize",
        load_if_exists=True,
    )
    existing_direction = study.direction.name.lower()
    if existing_direction != sweep.direction:
        raise ConfigError(
            f"study '{sweep.study_name}' in {display_url(storage.url)} is a {existing_direction} "
            f"study, but sweep.direction={sweep.direction}; choose another sweep.study_name"
        )
    existing_metric = study.user_attrs.get("metric")
    if existing_metric is None:
        study.set_user_attr("metric", sweep.metric)
    elif existing_metric != sweep.metric:
        raise ConfigError(
            f"study '{sweep.study_name}' optimises {existing_metric}, but sweep.metric="
            f"{sweep.metric}; choose another sweep.study_name"
        )
    # Offset the seed by the trials already there, so a joining worker does not replay the
    # random start-up points of the first one; a lone worker stays reproducible.
    base_seed = sweep.sampler_seed if sweep.sampler_seed is not None else cfg.seed
    seed = base_seed + len(study.trials)
    return optuna.load_study(
        study_name=sweep.study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_PRUNER_STARTUP_TRIALS,
            n_warmup_steps=sweep.pruner_warmup_epochs,
        ),
    )


# --- tracking -----------------------------------------------------------------------------------


class SweepTracker(Protocol):
    """The MLflow parent run of a sweep; a null tracker stands in when tracking is off."""

    @property
    def run_id(self) -> str | None: ...

    def mark_trial(self, trial_number: int, state: str, run_id: str | None) -> None: ...

    def finish(self, study: optuna.Study, status: str) -> None: ...


class NullSweepTracker:
    """Tracks nothing itself; `group` (if any) is passed on to training as the parent id."""

    def __init__(self, group: str | None = None) -> None:
        self.group = group

    @property
    def run_id(self) -> str | None:
        return self.group

    def mark_trial(self, trial_number: int, state: str, run_id: str | None) -> None:
        pass

    def finish(self, study: optuna.Study, status: str) -> None:
        pass


class MlflowSweepTracker:
    """The sweep's MLflow parent run; each trial's training run becomes its child.

    Workers that join a study share its parent run: its id is kept in the study's user attrs.
    Run creation and metrics go through `opsloop.tracking`; the few calls it has no helper for
    (tags and status of existing runs) use an `MlflowClient` directly.
    """

    def __init__(self, client: Any, tracking_uri: str, run_id: str) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self._run_id = run_id

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @classmethod
    def open(cls, cfg: OpsloopConfig, study: optuna.Study) -> MlflowSweepTracker:
        """Reopen the study's parent run in this tracking store, or create it."""
        from opsloop.tracking import (
            check_tracking_reachable,
            create_run,
            log_params_to_run,
            resolve_tracking_uri,
        )

        workspace = Path(cfg.workspace)
        uri = resolve_tracking_uri(cfg.logger, workspace)
        check_tracking_reachable(uri)
        client = connect_tracking_store(uri)
        known = study.user_attrs.get(PARENT_RUN_ATTR)
        if known:
            tracker = cls(client, uri, str(known))
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
                "optuna.storage": display_url(storage_url(cfg)),
            },
        )
        log_params_to_run(run_id, uri, search_space_params(cfg))
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return cls(client, uri, run_id)

    def reopen(self) -> bool:
        """Mark the parent run running again; False when this store does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(self._run_id, status="RUNNING")
        except MlflowException:
            return False  # the study was tracked in another store: start a parent here
        return True

    def mark_trial(self, trial_number: int, state: str, run_id: str | None) -> None:
        """Tag a trial's run with its Optuna state; a pruned run ends KILLED, not FAILED."""
        if run_id is None:
            logger.warning("trial %d has no MLflow run to mark %s", trial_number, state)
            return
        with self._best_effort(f"mark trial {trial_number}'s run {run_id} {state}"):
            self.client.set_tag(run_id, "optuna.state", state)
            if state == "PRUNED":
                # Stopped on purpose, not broken: training ends a run it cannot finish FAILED.
                self.client.set_terminated(run_id, status="KILLED")

    def finish(self, study: optuna.Study, status: str) -> None:
        """Log the study's best value, best params and trial counts; end the parent run."""
        from opsloop.tracking import log_metrics_to_run

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        with self._best_effort(f"finish the parent run {self._run_id}"):
            metrics = {"n_complete": float(len(complete)), "n_pruned": float(len(pruned))}
            if complete:
                metrics["best_value"] = study.best_value
                best = study.best_trial
                self.client.set_tag(self._run_id, "best_trial", str(best.number))
                for key, value in best.params.items():
                    self.client.set_tag(self._run_id, f"best.{key}", str(value))
            log_metrics_to_run(self._run_id, self.tracking_uri, metrics)
            self.client.set_terminated(self._run_id, status=status)

    @contextlib.contextmanager
    def _best_effort(self, action: str) -> Iterator[None]:
        # Bookkeeping on finished runs must not end a sweep, nor hide the error that ends one.
        try:
            yield
        except Exception as exc:
            logger.warning("could not %s in %s: %s", action, self.tracking_uri, _first_line(exc))


def connect_tracking_store(uri: str) -> Any:
    """An `MlflowClient` whose store is ready: a new SQLite store is created (migrated) now.

    Parallel workers on a fresh workspace would otherwise race to create it at their first run.
    """
    from mlflow import MlflowClient

    def connect() -> Any:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        return client

    try:
        return retry_schema_race(connect)
    except Exception as exc:  # MLflow, SQLAlchemy and Alembic each raise their own
        raise TrackingError(
            f"cannot open the tracking store {uri}: {_first_line(exc)}; "
            "check logger.tracking_uri or OPSLOOP_TRACKING_URI"
        ) from exc


def open_tracker(cfg: OpsloopConfig, study: optuna.Study) -> SweepTracker:
    """The sweep's MLflow parent run; a W&B group; or nothing (`logger=none`)."""
    if cfg.logger.name == "mlflow":
        return MlflowSweepTracker.open(cfg, study)
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


# --- one trial ----------------------------------------------------------------------------------


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
    return dataclasses.replace(
        trial_cfg,
        logger=dataclasses.replace(trial_cfg.logger, run_name=run_name, tags=tags),
        # Training logs and saves its whole config: a storage password must not go with it.
        sweep=dataclasses.replace(trial_cfg.sweep, storage=_hidden_storage(cfg.sweep.storage)),
    )


def _hidden_storage(url: str | None) -> str | None:
    return display_url(url) if url else None


# --- the best trial, saved ----------------------------------------------------------------------


def best_config_delta(
    best: OpsloopConfig, baseline: OpsloopConfig, params: Mapping[str, Any]
) -> dict[str, Any]:
    """What `best` changes relative to `baseline` (the root defaults), as nested keys.

    The tuned parameters are always included, even where they equal a default, so the file
    documents the result; where a run happens (workspace, data directories, tracking) is not.
    """
    delta = _diff(_as_container(best), _as_container(baseline))
    for key in _ENVIRONMENT_KEYS:
        _pop_path(delta, key)
    for key, value in params.items():
        _set_path(delta, key, value)
    return delta


def render_experiment(
    delta: Mapping[str, Any], *, study_name: str, header: Sequence[str] = ()
) -> str:
    """A Hydra experiment file (`# @package _global_`) holding `delta`."""
    from omegaconf import OmegaConf

    lines = ["# @package _global_", *(f"# {line}" for line in header)]
    lines.append(f"# Train it: opsloop train experiment=sweep_{study_name}")
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(dict(delta)))


def _as_container(cfg: OpsloopConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    if not isinstance(container, dict):
        raise AssertionError("a structured config must convert to a dict")
    return {str(k): v for k, v in container.items()}


def _diff(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = _diff(value, before)
            if nested:
                out[key] = nested
        elif key not in old or value != before:
            out[key] = value
    return out


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _pop_path(tree: dict[str, Any], key: str) -> None:
    """Remove a dotted key, and the sections it leaves empty."""
    *parents, last = key.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)
        if parents and not node:
            _pop_path(tree, ".".join(parents))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
