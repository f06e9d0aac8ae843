"""The study's storage: one Optuna study in an RDB that every sweep worker shares.

`open_study(cfg, open_storage(storage_url(cfg)))` creates the study or joins it. The default
storage is `sqlite:///<workspace>/optuna.db`; any SQLAlchemy URL (`sweep.storage`) lets workers
on many machines join one study.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna

from opsloop.config import OpsloopConfig
from opsloop.errors import ConfigError, OpsloopError, first_line, redact_url

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# A worker that dies without a word leaves its trial RUNNING; its missing heartbeat fails it.
HEARTBEAT_SECONDS = 60
SQLITE_TIMEOUT_SECONDS = 60
SCHEMA_ATTEMPTS = 3
SCHEMA_RETRY_SECONDS = 1.0
MEDIAN_PRUNER_STARTUP_TRIALS = 5


def storage_url(cfg: OpsloopConfig) -> str:
    """`sweep.storage`, or the embedded `sqlite:///<absolute workspace>/optuna.db`."""
    if cfg.sweep.storage:
        return cfg.sweep.storage
    workspace = Path(cfg.workspace).expanduser().resolve()
    return f"sqlite:///{workspace / 'optuna.db'}"


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
            f"cannot open the sweep storage {redact_url(url)}: {first_line(exc)}; "
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
            logger.debug("attempt %d failed, retrying: %s", attempt, first_line(exc))
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
    return create_or_join_study(cfg, storage)[0]


def create_or_join_study(
    cfg: OpsloopConfig, storage: optuna.storages.RDBStorage
) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it.

    Of workers started at the same moment exactly one creates it (the storage's unique study
    name decides), so that one can set up what the study shares, such as its MLflow parent run.
    """
    sweep = cfg.sweep
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=sweep.study_name,
            direction="maximize" if sweep.direction == "maximize" else "minimize",
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=sweep.study_name, storage=storage)
        created = False
    existing_direction = study.direction.name.lower()
    if existing_direction != sweep.direction:
        raise ConfigError(
            f"study '{sweep.study_name}' in {redact_url(storage.url)} is a {existing_direction} "
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
    joined = optuna.load_study(
        study_name=sweep.study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_PRUNER_STARTUP_TRIALS,
            n_warmup_steps=sweep.pruner_warmup_epochs,
        ),
    )
    return joined, created
