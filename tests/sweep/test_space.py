"""The search space: sampling it, checking it before any trial, applying a trial's values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest

from opsloop.config import ParamSpec
from opsloop.errors import ConfigError
from opsloop.sweep.space import apply_params, suggest_params, validate_sweep
from tests.sweep.support import sweep_config, with_params


def test_the_default_search_space_is_valid_and_sampled_in_range(workspace: Path) -> None:
    cfg = sweep_config(workspace)
    validate_sweep(cfg)
    trial = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).ask()
    values = suggest_params(trial, cfg.sweep.params)
    assert set(values) == {"optim.lr", "optim.weight_decay", "model.channels", "model.dropout"}
    assert 3e-4 <= values["optim.lr"] <= 1e-2
    assert values["model.channels"] in (16, 32, 64)
    assert 0.0 <= values["model.dropout"] <= 0.4
    assert trial.params == values  # Optuna records each value under its config path


def test_int_and_stepped_ranges_are_sampled_on_their_grid(workspace: Path) -> None:
    params = {
        "model.depth": ParamSpec(type="int", low=1, high=3),
        "model.hidden": ParamSpec(type="int", low=32, high=128, step=32),
        "model.dropout": ParamSpec(type="float", low=0.0, high=0.3, step=0.1),
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        values = suggest_params(study.ask(), params)
        assert values["model.depth"] in (1, 2, 3)
        assert values["model.hidden"] in (32, 64, 96, 128)
        assert round(values["model.dropout"] * 10) == pytest.approx(values["model.dropout"] * 10)


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("optim.lr", ParamSpec(low=0.01, high=0.001), r"low=0\.01 must be below high"),
        ("optim.lr", ParamSpec(low=0.01), r"a float range needs both"),
        ("optim.lr", ParamSpec(low=0.0, high=0.1, log=True), r"a log range needs low > 0"),
        ("optim.lr", ParamSpec(low=1e-4, high=0.1, log=True, step=0.01), r"cannot be combined"),
        ("model.depth", ParamSpec(type="int", low=1.5, high=3), r"an int range needs a whole low"),
        ("model.channels", ParamSpec(type="categorical"), r"a categorical needs"),
        ("model.channels", ParamSpec(type="categorical", choices=[]), r"non-empty `choices`"),
        ("model.channels", ParamSpec(type="categorical", choices=[8], low=1), r"only `choices`"),
        ("model.depth", ParamSpec(type="int", choices=[1, 2]), r"belongs to type categorical"),
        ("optim.lrr", ParamSpec(low=0.1, high=1), r"'lrr' is not a key of optim; use one of"),
        ("optimizer.lr", ParamSpec(low=0.1, high=1), r"'optimizer' is not a key of the config"),
        ("optim", ParamSpec(low=0.1, high=1), r"optim is a section, not a value"),
        ("optim.lr.max", ParamSpec(low=0.1, high=1), r"optim\.lr is a value, not a section"),
        ("sweep.n_trials", ParamSpec(type="int", low=1, high=3), r"cannot be swept"),
        # Valid specs whose values the config itself rejects: caught before any trial.
        ("model.dropout", ParamSpec(low=0.0, high=1.0), r"the value 1\.0 is not valid there"),
        ("model.channels", ParamSpec(type="categorical", choices=[16, "wide"]), r"'wide' is not"),
        ("optim.optimizer", ParamSpec(type="categorical", choices=["adamw", "lion"]), r"'lion'"),
    ],
)
def test_a_bad_search_space_entry_is_a_one_line_error_naming_it(
    workspace: Path, key: str, spec: ParamSpec, message: str
) -> None:
    cfg = with_params(sweep_config(workspace), **{key.replace(".", "__"): spec})
    with pytest.raises(
        ConfigError, match=rf"^sweep\.params\.{re.escape(key)}: .*{message}"
    ) as info:
        validate_sweep(cfg)
    assert "\n" not in str(info.value)


def test_an_unknown_parameter_type_names_the_known_ones(workspace: Path) -> None:
    cfg = with_params(sweep_config(workspace), optim__lr=ParamSpec(type="uniform", low=0.1, high=1))
    with pytest.raises(
        ConfigError,
        match=r"^sweep\.params\.optim\.lr\.type='uniform' is unknown; "
        r"use one of: float, int, categorical$",
    ):
        validate_sweep(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.study_name=my/study"], r"sweep\.study_name='my/study' is not usable"),
        (["sweep.n_trials=0"], r"sweep\.n_trials=0 must be at least 1"),
        (["sweep.timeout_seconds=0"], r"sweep\.timeout_seconds=0\.0 must be positive"),
        (["sweep.pruner_warmup_epochs=-1"], r"pruner_warmup_epochs=-1"),
    ],
)
def test_bad_sweep_settings_are_rejected_when_the_config_loads(
    workspace: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep_config(workspace, *overrides)


def test_a_sweep_over_several_processes_is_rejected(workspace: Path) -> None:
    cfg = sweep_config(workspace, "trainer=ddp")  # a valid config, just not for a sweep
    with pytest.raises(ConfigError, match=r"one process, but trainer\.strategy=ddp devices=2"):
        validate_sweep(cfg)


def test_an_empty_search_space_says_how_to_fill_it(workspace: Path) -> None:
    cfg = with_params(sweep_config(workspace))
    with pytest.raises(ConfigError, match=r"sweep\.params is empty; add a search space"):
        validate_sweep(cfg)


def test_apply_params_sets_typed_values_on_a_copy(workspace: Path) -> None:
    cfg = sweep_config(workspace)
    trial_cfg = apply_params(
        cfg, {"optim.lr": 1, "model.channels": 16, "optim.optimizer": "sgd", "seed": 7}
    )
    assert trial_cfg.optim.lr == 1.0
    assert isinstance(trial_cfg.optim.lr, float)  # converted as a command-line override would be
    assert trial_cfg.model.channels == 16
    assert trial_cfg.optim.optimizer == "sgd"
    assert trial_cfg.seed == 7
    assert (cfg.optim.lr, cfg.model.channels, cfg.seed) == (3e-3, 32, 42)  # the original is intact
    assert trial_cfg.data == cfg.data


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model.dropout": 1.5}, r"model\.dropout=1\.5 is out of range"),
        ({"model.channels": "wide"}, r"model\.channels='wide' does not fit the config: \S"),
        ({"model.width": 3}, r"'width' is not a key of model"),
        ({"optim.optimizer": "lion"}, r"optim\.optimizer='lion' is unknown"),
    ],
)
def test_apply_params_rejects_what_the_config_rejects(
    workspace: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        apply_params(sweep_config(workspace), values)
    assert "\n" not in str(info.value)
