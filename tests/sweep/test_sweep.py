"""Whole sweeps through `run_sweep` and the CLI: with a stand-in for training, then for real.

The fast tests train nothing (`FakeTrain`); the `slow` tests run real tiny sweeps.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from opsloop.config import OpsloopConfig, ParamSpec, load_config
from opsloop.errors import ConfigError
from opsloop.sweep import run_sweep
from opsloop.sweep.space import apply_params
from tests.sweep.support import FakeTrain, sweep_config, with_logger, with_params


def test_a_bad_search_space_fails_before_any_trial_or_storage(
    workspace: Path, config_copy: Path
) -> None:
    cfg = with_params(sweep_config(workspace), optim__lr=ParamSpec(low=1.0, high=0.1))

    def must_not_train(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a trial ran despite a bad search space")

    with pytest.raises(ConfigError, match=r"optim\.lr: low=1\.0 must be below high=0\.1"):
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=must_not_train)
    assert not (workspace / "optuna.db").exists()


def test_a_sweep_needs_at_least_one_trial(workspace: Path, config_copy: Path) -> None:
    with pytest.raises(ConfigError, match=r"n_trials=0 must be at least 1"):
        run_sweep(sweep_config(workspace), n_trials=0, config_dir=config_copy, train_fn=FakeTrain())
    assert not (workspace / "optuna.db").exists()


def test_a_sweep_prunes_weak_trials_and_saves_a_loadable_best_config(
    workspace: Path, config_copy: Path
) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=5", "sweep.study_name=fake")
    train = FakeTrain()
    result = run_sweep(cfg, n_trials=12, config_dir=config_copy, train_fn=train)

    assert len(train.configs) == 12
    assert result.n_complete + result.n_pruned == 12
    assert result.n_pruned >= 1  # MedianPruner cut some trials after the 5 start-up ones
    assert result.n_complete >= 5
    assert result.storage == f"sqlite:///{workspace.resolve()}/optuna.db"
    assert result.parent_run_id is None  # logger=none: no tracking at all
    assert not (workspace / "mlflow.db").exists()
    # The trial's value is its best epoch's (the last, here), computed from the callback.
    expected = abs(math.log10(result.best_params["optim.lr"] / 3e-3))
    assert result.best_value == pytest.approx(expected + result.best_params["model.dropout"] + 0.2)
    # Each trial's config carries its sampled values, run name and tags.
    first = train.configs[0]
    assert first.logger.run_name == "fake-trial-0"
    assert first.logger.tags["optuna.trial_number"] == "0"
    assert first.logger.tags["optuna.param.optim.lr"] == str(first.optim.lr)

    assert result.best_config_path == config_copy / "experiment" / "sweep_fake.yaml"
    copy = workspace / "outputs" / "sweeps" / "fake" / "sweep_fake.yaml"
    assert copy.read_text() == result.best_config_path.read_text()
    loaded = load_config(["experiment=sweep_fake"], config_dir=config_copy)
    assert loaded.optim.lr == result.best_params["optim.lr"]
    assert loaded.optim.weight_decay == result.best_params["optim.weight_decay"]
    assert loaded.model.channels == result.best_params["model.channels"]
    assert loaded.model.dropout == result.best_params["model.dropout"]
    assert loaded.trainer.max_epochs == 5  # the sweep's own override is part of the trial

    with result.trials_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert {row["state"] for row in rows} == {"COMPLETE", "PRUNED"}
    assert "params_optim.lr" in rows[0]


def test_optuna_logs_go_through_the_applications_handlers(
    workspace: Path, config_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=1", "sweep.study_name=logged")
    # Optuna's own defaults, whatever an earlier sweep in this process set.
    optuna.logging.enable_default_handler()
    optuna.logging.disable_propagation()
    with caplog.at_level(logging.INFO):
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    optuna_logger = logging.getLogger("optuna")
    assert optuna_logger.propagate
    # Optuna's own stderr handler is gone (pytest's capturing handlers may be there).
    assert not [h for h in optuna_logger.handlers if type(h) is logging.StreamHandler]
    assert any(
        r.name.startswith("optuna") and "Trial 0 finished" in r.message for r in caplog.records
    )


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli_configs(monkeypatch: pytest.MonkeyPatch, config_copy: Path) -> Path:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(config_copy))
    return config_copy


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_rejects_a_bad_sweep_in_one_line_before_training(
    cli_configs: Path, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opsloop.cli import main

    assert main(["sweep", f"workspace={workspace}", "sweep.study_name=a/b"]) == 2
    assert "sweep.study_name='a/b' is not usable" in one_error_line(capsys.readouterr().err)
    assert main(["sweep", "--n-trials", "0"]) == 2
    assert "--n-trials" in one_error_line(capsys.readouterr().err)
    assert not (workspace / "optuna.db").exists()


# --- real sweeps: tiny training runs ------------------------------------------------------------


@pytest.mark.slow
def test_a_real_sweep_saves_a_config_that_reproduces_the_best_trial(
    tiny: OpsloopConfig, workspace: Path, config_copy: Path
) -> None:
    from opsloop.train import train_model

    cfg = with_logger(tiny, "none", "tiny3")
    result = run_sweep(cfg, n_trials=3, config_dir=config_copy)

    assert (result.n_complete, result.n_pruned) == (3, 0)  # no pruning in the 5 start-up trials
    assert result.parent_run_id is None
    assert not (workspace / "mlflow.db").exists()
    assert 0.0 < result.best_value < 2.5  # a cross-entropy over 10 classes, after some learning
    study = optuna.load_study(study_name="tiny3", storage=result.storage)
    assert result.best_value == min(t.value for t in study.trials if t.value is not None)

    where = [f"data.processed_dir={workspace / 'processed'}", f"workspace={workspace}"]
    loaded = load_config(["experiment=sweep_tiny3", "logger=none", *where], config_dir=config_copy)
    best = apply_params(cfg, result.best_params)
    for section in ("model", "optim", "trainer"):
        assert getattr(loaded, section) == getattr(best, section), section
    assert loaded.data.batch_size == best.data.batch_size
    assert loaded.seed == best.seed
    # Training the saved config again gives the best trial's validation loss: it is that trial.
    again = train_model(loaded)
    assert again.metrics["val/loss_best"] == pytest.approx(result.best_value, rel=1e-4)


@pytest.mark.slow
def test_cli_sweep_prints_the_best_trial_and_where_it_went(
    tiny: OpsloopConfig,
    workspace: Path,
    cli_configs: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from opsloop.cli import main

    args = [
        "sweep",
        "--n-trials",
        "1",
        "experiment=tiny",
        "logger=none",
        f"workspace={workspace}",
        f"data.processed_dir={workspace / 'processed'}",
        "sweep.study_name=cli",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "study cli" in out
    assert "1 complete, 0 pruned" in out
    assert "optim.lr=" in out
    assert str(cli_configs / "experiment" / "sweep_cli.yaml") in out.replace("\n", "")
    assert "opsloop train experiment=sweep_cli" in out
    assert (cli_configs / "experiment" / "sweep_cli.yaml").is_file()
