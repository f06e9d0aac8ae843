"""The search space: sampling one trial's values and applying them to the typed config.

`validate_sweep(cfg)` checks a space before any trial runs (beyond what `load_config` checks:
a space must exist, fit the config and train in one process); `suggest_params` samples a trial's
values and `apply_params` turns them into that trial's validated config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna

from opsloop.config import (
    OpsloopConfig,
    ParamSpec,
    check_param_path,
    validate_config,
    validate_sweep_config,
)
from opsloop.errors import ConfigError, first_line

logger = logging.getLogger(__name__)


def validate_sweep(cfg: OpsloopConfig) -> None:
    """Check the sweep settings and every search-space entry before any trial runs."""
    validate_sweep_config(cfg)
    if not cfg.sweep.params:
        raise ConfigError(
            "sweep.params is empty; add a search space such as "
            "`optim.lr: {type: float, low: 0.0003, high: 0.01, log: true}` to configs/sweep/"
        )
    _check_single_process(cfg)
    for key, spec in cfg.sweep.params.items():
        _check_values_fit(cfg, key, spec)


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
            raise ConfigError(
                f"{key}={value!r} does not fit the config: {first_line(exc)}"
            ) from exc
    typed = OmegaConf.to_object(conf)
    if not isinstance(typed, OpsloopConfig):
        raise AssertionError(f"OmegaConf returned {type(typed).__name__}, not OpsloopConfig")
    validate_config(typed)
    return typed
