"""The best trial, saved: the config delta, the experiment file, and where it is written."""

from __future__ import annotations

from pathlib import Path

import optuna

from opsloop.config import load_config
from opsloop.sweep.best import best_config_delta, render_experiment, save_best
from opsloop.sweep.space import apply_params
from tests.support import CONFIG_DIR
from tests.sweep.support import sweep_config


def test_the_best_config_delta_holds_only_what_differs(workspace: Path) -> None:
    baseline = load_config([], config_dir=CONFIG_DIR)
    best = apply_params(
        sweep_config(workspace, "experiment=tiny", "seed=3"),
        {"optim.lr": 0.005, "model.dropout": 0.0},
    )
    delta = best_config_delta(best, baseline, {"optim.lr": 0.005, "model.dropout": 0.0})
    assert delta["optim"] == {"lr": 0.005}
    # tiny's model (cnn_small) differs; the tuned dropout stays although cnn_small's is 0.0 too.
    assert delta["model"] == {"channels": 8, "depth": 1, "hidden": 32, "dropout": 0.0}
    assert delta["trainer"]["max_epochs"] == 2
    assert delta["data"] == {"batch_size": 128}  # not processed_dir/cache_dir: where, not what
    assert delta["seed"] == 3
    assert not {"workspace", "logger", "sweep", "output_dir"} & set(delta)


def test_the_rendered_experiment_is_a_global_package(workspace: Path) -> None:
    text = render_experiment({"optim": {"lr": 0.001}}, study_name="s1", header=["Best trial."])
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    assert "# Best trial." in lines
    assert "# Train it: opsloop train experiment=sweep_s1" in lines
    assert "optim:\n  lr: 0.001\n" in text


def one_trial_study(lr: float) -> optuna.Study:
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": lr},
            distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1)},
            value=0.25,
        )
    )
    return study


def test_without_a_writable_config_dir_the_best_config_is_kept_in_the_workspace(
    workspace: Path, tmp_path: Path
) -> None:
    cfg = sweep_config(workspace, "sweep.study_name=kept")
    blocker = tmp_path / "configs"
    blocker.write_text("a file, not a directory: experiment/ cannot be created under it")
    baseline = load_config([], config_dir=CONFIG_DIR)
    path, trials_csv = save_best(cfg, one_trial_study(0.002), baseline, blocker)
    assert path == workspace / "outputs" / "sweeps" / "kept" / "sweep_kept.yaml"
    text = path.read_text()
    assert "optim:\n  lr: 0.002\n" in text
    assert "val/loss=0.25 (minimize)" in text
    assert trials_csv.read_text().count("\n") == 2  # the header and the one trial


def test_the_saved_experiment_loads_as_the_best_trial(workspace: Path, config_copy: Path) -> None:
    cfg = sweep_config(workspace, "sweep.study_name=loaded", "model.dropout=0.2")
    baseline = load_config([], config_dir=config_copy)
    path, _ = save_best(cfg, one_trial_study(0.004), baseline, config_copy)
    assert path == config_copy / "experiment" / "sweep_loaded.yaml"
    loaded = load_config(["experiment=sweep_loaded"], config_dir=config_copy)
    assert loaded.optim.lr == 0.004
    assert loaded.model.dropout == 0.2  # the sweep's own override is part of every trial
