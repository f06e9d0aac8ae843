"""The best trial, saved: a Hydra experiment file holding what it changes, and the trials table.

`save_best` writes `configs/experiment/sweep_<study>.yaml` (what the best trial changes relative
to the root defaults, plus the tuned values), so `opsloop train experiment=sweep_<study>`
reproduces the trial; a copy and `trials.csv` go to `<workspace>/<output_dir>/sweeps/<study>/`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from opsloop.atomic import write_text_atomically
from opsloop.config import OpsloopConfig
from opsloop.sweep.space import apply_params

logger = logging.getLogger(__name__)

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
