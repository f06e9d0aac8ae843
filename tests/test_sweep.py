"""Sweeps: the search space, applying trial values, pruning, the shared study and the saved best.

The fast tests train nothing: `FakeTrain` stands in for `train_model` and drives the real
pruning callback through a made-up loss curve. The `slow` tests run real tiny sweeps.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import optuna
import pytest
from optuna.trial import TrialState

from opsloop import sweep
from opsloop.config import OpsloopConfig, ParamSpec, load_config
from opsloop.errors import ConfigError, OpsloopError
from opsloop.sweep import (
    PruningCallback,
    apply_params,
    best_config_delta,
    display_url,
    render_experiment,
    run_sweep,
    storage_url,
    suggest_params,
    trial_config,
    validate_sweep,
)
from tests.support import CONFIG_DIR, make_config


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """The repo's configs, copied so a sweep's saved experiment file lands under tmp_path."""
    target = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, target)
    return target


def sweep_config(workspace: Path, *overrides: str) -> OpsloopConfig:
    return make_config(workspace, f"workspace={workspace}", "logger=none", *overrides)


def with_params(cfg: OpsloopConfig, **params: ParamSpec) -> OpsloopConfig:
    """`cfg` with a search space whose keys are config paths (`optim__lr` -> `optim.lr`)."""
    space = {key.replace("__", "."): spec for key, spec in params.items()}
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, params=space))


# --- the search space ---------------------------------------------------------------------------


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
        ("optim.lr", ParamSpec(type="uniform", low=0.1, high=1), r"type 'uniform' is unknown"),
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.study_name=my/study"], r"sweep\.study_name='my/study' is not usable"),
        (["sweep.n_trials=0"], r"sweep\.n_trials=0 must be at least 1"),
        (["sweep.timeout_seconds=0"], r"sweep\.timeout_seconds=0\.0 must be positive"),
        (["sweep.pruner_warmup_epochs=-1"], r"pruner_warmup_epochs=-1"),
        (["trainer=ddp"], r"one process, but trainer\.strategy=ddp devices=2"),
    ],
)
def test_bad_sweep_settings_are_rejected(
    workspace: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_sweep(sweep_config(workspace, *overrides))


def test_an_empty_search_space_says_how_to_fill_it(workspace: Path) -> None:
    cfg = with_params(sweep_config(workspace))
    with pytest.raises(ConfigError, match=r"sweep\.params is empty; add a search space"):
        validate_sweep(cfg)


def test_a_bad_search_space_fails_before_any_trial_or_storage(
    workspace: Path, config_copy: Path
) -> None:
    cfg = with_params(sweep_config(workspace), optim__lr=ParamSpec(low=1.0, high=0.1))

    def must_not_train(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a trial ran despite a bad search space")

    with pytest.raises(ConfigError, match=r"optim\.lr: low=1\.0 must be below high=0\.1"):
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=must_not_train)
    assert not (workspace / "optuna.db").exists()


# --- applying a trial's values ------------------------------------------------------------------


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
        ({"model.channels": "wide"}, r"model\.channels='wide' does not fit the config"),
        ({"model.width": 3}, r"'width' is not a key of model"),
        ({"optim.optimizer": "lion"}, r"optim\.optimizer='lion' is unknown"),
    ],
)
def test_apply_params_rejects_what_the_config_rejects(
    workspace: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_params(sweep_config(workspace), values)


def test_a_trial_config_keeps_no_storage_password(workspace: Path) -> None:
    url = "postgresql://optuna:s3cret@db.example/studies"
    cfg = sweep_config(workspace, f"sweep.storage={url}", "sweep.study_name=pw")
    trial_cfg = trial_config(cfg, 4, {"optim.lr": 0.002})
    assert "s3cret" not in str(trial_cfg.sweep.storage)
    assert trial_cfg.optim.lr == 0.002
    assert trial_cfg.logger.run_name == "pw-trial-4"
    assert trial_cfg.logger.tags["optuna.param.optim.lr"] == "0.002"
    assert cfg.sweep.storage == url  # the sweep's own config is unchanged


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


def test_storage_defaults_to_sqlite_in_the_workspace_and_hides_passwords(workspace: Path) -> None:
    assert storage_url(sweep_config(workspace)) == f"sqlite:///{workspace.resolve()}/optuna.db"
    url = "postgresql://optuna:s3cret@db.example:5432/studies"
    assert storage_url(sweep_config(workspace, f"sweep.storage={url}")) == url
    assert "s3cret" not in display_url(url)
    assert display_url(url).endswith("@db.example:5432/studies")


def test_opening_a_new_database_is_retried_when_workers_race(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sweep, "SCHEMA_RETRY_SECONDS", 0.0)
    failures = iter([RuntimeError("table trials already exists")])

    def open_once_raced() -> str:
        for failure in failures:
            raise failure
        return "opened"

    assert sweep.retry_schema_race(open_once_raced) == "opened"


def test_an_unusable_storage_is_a_one_line_error_without_its_password(
    workspace: Path, config_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep, "SCHEMA_RETRY_SECONDS", 0.0)
    cfg = sweep_config(workspace, "sweep.storage=nosuchdb://optuna:s3cret@host/studies")
    with pytest.raises(OpsloopError, match=r"cannot open the sweep storage nosuchdb://") as info:
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)


# --- pruning ------------------------------------------------------------------------------------


def fake_trainer(epoch: int, metrics: dict[str, float], *, sanity: bool = False) -> Any:
    return SimpleNamespace(sanity_checking=sanity, current_epoch=epoch, callback_metrics=metrics)


def study_with_history(
    warmup: int, *, direction: str = "minimize", finals: Sequence[float] = (0.5, 0.4, 0.3)
) -> optuna.Study:
    """An in-memory study with 3 finished trials whose metric moved by 0.2 an epoch to `finals`."""
    study = optuna.create_study(
        direction=direction,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
    )
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    sign = 1.0 if direction == "minimize" else -1.0  # losses fall, accuracies rise
    for final in finals:
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.5},
                distributions={"x": dist},
                value=final,
                intermediate_values={
                    0: final + 0.4 * sign,
                    1: final + 0.2 * sign,
                    2: final,
                },
            )
        )
    return study


def test_the_pruning_callback_prunes_a_lagging_trial_after_warmup() -> None:
    study = study_with_history(warmup=1)
    trial = study.ask()
    callback = PruningCallback(trial, "val/loss")
    module = L.LightningModule()
    # The sanity check's number is ignored: not reported, not part of the best value.
    callback.on_validation_end(fake_trainer(0, {"val/loss": 0.01}, sanity=True), module)
    # Epoch 0 is worse than every peer, but within the warm-up: it must not be pruned.
    callback.on_validation_end(fake_trainer(0, {"val/loss": 2.0}), module)
    with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 1: val/loss=1\.5"):
        callback.on_validation_end(fake_trainer(1, {"val/loss": 1.5}), module)
    assert callback.pruned_epoch == 1
    assert callback.history == {0: 2.0, 1: 1.5}
    assert callback.best == 1.5
    frozen = study.trials[-1]
    assert frozen.intermediate_values == {0: 2.0, 1: 1.5}


def test_the_pruning_callback_lets_a_leading_trial_run_and_keeps_its_best() -> None:
    # The peers reached accuracies of 0.3, 0.5, 0.6 at epoch 0; this trial leads at every epoch.
    study = study_with_history(warmup=0, direction="maximize", finals=(0.7, 0.9, 1.0))
    callback = PruningCallback(study.ask(), "val/acc", maximize=True)
    module = L.LightningModule()
    for epoch, acc in enumerate((0.8, 0.95, 0.9)):
        callback.on_validation_end(fake_trainer(epoch, {"val/acc": acc}), module)
    assert callback.pruned_epoch is None
    assert callback.history == {0: 0.8, 1: 0.95, 2: 0.9}
    assert callback.best == 0.95  # the best epoch's value, not the last one's


def test_a_missing_metric_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    callback = PruningCallback(study_with_history(warmup=0).ask(), "val/f2")
    callback.on_validation_end(fake_trainer(0, {"val/loss": 0.3}), L.LightningModule())
    assert callback.best is None
    assert "metric 'val/f2' was not logged this epoch; logged: val/loss" in caplog.text


# --- whole sweeps with a stand-in for training --------------------------------------------------


@dataclass
class FakeResult:
    run_dir: Path
    metrics: dict[str, float]
    run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.ckpt"


class FakeTrain:
    """Calls the callbacks as Lightning would, with a loss that is lowest near lr=3e-3."""

    def __init__(self) -> None:
        self.configs: list[OpsloopConfig] = []

    def __call__(
        self,
        cfg: OpsloopConfig,
        *,
        callbacks: Sequence[L.Callback] = (),
        parent_run_id: str | None = None,
    ) -> FakeResult:
        self.configs.append(cfg)
        module = L.LightningModule()
        floor = abs(math.log10(cfg.optim.lr / 3e-3)) + cfg.model.dropout
        for callback in callbacks:
            callback.on_validation_end(fake_trainer(0, {}, sanity=True), module)
        loss = math.inf
        for epoch in range(cfg.trainer.max_epochs):
            loss = floor + 1.0 / (epoch + 1)
            for callback in callbacks:
                callback.on_validation_end(fake_trainer(epoch, {"val/loss": loss}), module)
        return FakeResult(run_dir=Path(cfg.workspace) / "runs", metrics={"val/loss": loss})


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


class WrappingTrain(FakeTrain):
    """Training that wraps every failure in its own error, as a real stage may."""

    def __call__(self, cfg: OpsloopConfig, **kwargs: Any) -> FakeResult:
        try:
            return super().__call__(cfg, **kwargs)
        except optuna.TrialPruned as exc:
            raise RuntimeError("training stopped by a callback") from exc


def test_a_pruned_trial_is_marked_pruned_even_when_training_wraps_the_error(
    workspace: Path, config_copy: Path
) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=5", "sweep.study_name=wrapped")
    result = run_sweep(cfg, n_trials=12, config_dir=config_copy, train_fn=WrappingTrain())
    study = optuna.load_study(study_name="wrapped", storage=result.storage)
    states = {trial.state for trial in study.trials}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED}
    assert result.n_pruned >= 1


def test_sequential_workers_join_one_study(workspace: Path, config_copy: Path) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=2", "sweep.study_name=shared")
    first = run_sweep(cfg, n_trials=3, config_dir=config_copy, train_fn=FakeTrain())
    second = run_sweep(cfg, n_trials=3, config_dir=config_copy, train_fn=FakeTrain())
    assert first.n_complete + first.n_pruned == 3
    assert second.n_complete + second.n_pruned == 6
    study = optuna.load_study(study_name="shared", storage=second.storage)
    assert len(study.trials) == 6
    # The joining worker's sampler is seeded past the first one's: no replayed trials.
    lrs = [trial.params["optim.lr"] for trial in study.trials]
    assert len(set(lrs)) == 6
    assert second.best_value <= first.best_value


def test_joining_a_study_with_another_direction_or_metric_fails(
    workspace: Path, config_copy: Path
) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=1", "sweep.study_name=one")
    run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    other = sweep_config(workspace, "sweep.study_name=one", "sweep.direction=maximize")
    with pytest.raises(ConfigError, match=r"'one' .* is a minimize study, but sweep\.direction"):
        run_sweep(other, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    other = sweep_config(workspace, "sweep.study_name=one", "sweep.metric=val/acc")
    with pytest.raises(ConfigError, match=r"optimises val/loss, but sweep\.metric=val/acc"):
        run_sweep(other, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())


def test_a_metric_training_never_logs_is_named(workspace: Path, config_copy: Path) -> None:
    cfg = sweep_config(workspace, "trainer.max_epochs=1", "sweep.metric=val/f2")
    with pytest.raises(ConfigError, match=r"sweep\.metric='val/f2' was not logged.*val/loss"):
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    study = optuna.load_study(study_name="opsloop", storage=storage_url(cfg))
    assert [t.state for t in study.trials] == [TrialState.FAIL]


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

# A small space around the tiny model, so each trial trains in seconds.
TINY_SPACE = {
    "optim__lr": ParamSpec(type="float", low=1e-3, high=3e-2, log=True),
    "model__channels": ParamSpec(type="categorical", choices=[4, 8]),
    "model__dropout": ParamSpec(type="float", low=0.0, high=0.3),
}


@pytest.fixture
def tiny(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> OpsloopConfig:
    """experiment=tiny with its dataset prepared and the tracking store in the workspace."""
    from opsloop.data import prepare_dataset

    monkeypatch.delenv("OPSLOOP_TRACKING_URI", raising=False)
    cfg = make_config(workspace, f"workspace={workspace}", "experiment=tiny")
    prepare_dataset(cfg.data)
    return with_params(cfg, **TINY_SPACE)


def with_logger(cfg: OpsloopConfig, name: str, study: str) -> OpsloopConfig:
    return dataclasses.replace(
        cfg,
        logger=dataclasses.replace(cfg.logger, name=name),
        sweep=dataclasses.replace(cfg.sweep, study_name=study),
    )


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
def test_a_tracked_sweep_nests_one_child_run_per_trial_under_its_parent(
    tiny: OpsloopConfig, workspace: Path, config_copy: Path
) -> None:
    from mlflow import MlflowClient

    result = run_sweep(with_logger(tiny, "mlflow", "tracked"), n_trials=3, config_dir=config_copy)

    client = MlflowClient(f"sqlite:///{workspace.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(tiny.logger.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert len(runs) == 4
    parent = parents[0]
    assert parent.info.run_name == "tracked"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(result.best_value)
    assert parent.data.metrics["n_complete"] == 3
    assert parent.data.params["space.model.channels"] == "categorical[4, 8]"
    for key, value in result.best_params.items():
        assert parent.data.tags[f"best.{key}"] == str(value)

    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1", "2"]
    study = optuna.load_study(study_name="tracked", storage=result.storage)
    for child in children:
        trial = study.trials[int(child.data.tags["optuna.trial_number"])]
        assert child.info.status == "FINISHED"
        assert child.info.run_name == f"tracked-trial-{trial.number}"
        assert child.data.tags["optuna.state"] == "COMPLETE"
        assert child.data.tags["optuna.param.optim.lr"] == str(trial.params["optim.lr"])
        assert trial.user_attrs["run_id"] == child.info.run_id
        assert child.data.metrics["val/loss_best"] == pytest.approx(trial.value)


@pytest.mark.slow
def test_a_real_trial_behind_its_peers_is_pruned_and_its_run_killed(
    tiny: OpsloopConfig, workspace: Path, config_copy: Path
) -> None:
    from mlflow import MlflowClient

    cfg = with_logger(tiny, "mlflow", "pruned")
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, pruner_warmup_epochs=0))
    # Five finished trials that reached a (made-up) val/loss of 0.01 at every epoch: any real
    # trial is behind their median at its first epoch.
    study = optuna.create_study(study_name="pruned", storage=storage_url(cfg))
    lr = optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)
    for _ in range(5):
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": 0.003},
                distributions={"optim.lr": lr},
                value=0.01,
                intermediate_values={0: 0.01, 1: 0.01},
            )
        )
    result = run_sweep(cfg, n_trials=1, config_dir=config_copy)

    assert (result.n_complete, result.n_pruned) == (5, 1)
    trial = optuna.load_study(study_name="pruned", storage=result.storage).trials[-1]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # stopped after its first validation epoch
    client = MlflowClient(f"sqlite:///{workspace.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name(cfg.logger.experiment)
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`optuna.trial_number` = '5'"
    )
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED"


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
