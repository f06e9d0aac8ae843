"""The study's storage: the default and configured URLs, races, and workers joining one study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from opsloop.errors import ConfigError, OpsloopError, redact_url
from opsloop.sweep import run_sweep
from opsloop.sweep import study as sweep_study
from opsloop.sweep.study import retry_schema_race, storage_url
from tests.sweep.support import FakeTrain, sweep_config


def test_storage_defaults_to_sqlite_in_the_workspace_and_hides_passwords(workspace: Path) -> None:
    assert storage_url(sweep_config(workspace)) == f"sqlite:///{workspace.resolve()}/optuna.db"
    url = "postgresql://optuna:s3cret@db.example:5432/studies"
    assert storage_url(sweep_config(workspace, f"sweep.storage={url}")) == url
    assert "s3cret" not in redact_url(url)
    assert redact_url(url).endswith("@db.example:5432/studies")


def test_opening_a_new_database_is_retried_when_workers_race(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sweep_study, "SCHEMA_RETRY_SECONDS", 0.0)
    failures = iter([RuntimeError("table trials already exists")])

    def open_once_raced() -> str:
        for failure in failures:
            raise failure
        return "opened"

    assert retry_schema_race(open_once_raced) == "opened"


def test_a_failure_that_persists_is_raised_after_the_last_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sweep_study, "SCHEMA_RETRY_SECONDS", 0.0)
    calls: list[int] = []

    def never_opens() -> str:
        calls.append(1)
        raise RuntimeError(f"attempt {len(calls)} failed")

    with pytest.raises(RuntimeError, match=r"attempt 3 failed"):
        retry_schema_race(never_opens)
    assert len(calls) == sweep_study.SCHEMA_ATTEMPTS


def test_an_unusable_storage_is_a_one_line_error_without_its_password(
    workspace: Path, config_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep_study, "SCHEMA_RETRY_SECONDS", 0.0)
    cfg = sweep_config(workspace, "sweep.storage=nosuchdb://optuna:s3cret@host/studies")
    with pytest.raises(OpsloopError, match=r"cannot open the sweep storage nosuchdb://") as info:
        run_sweep(cfg, n_trials=1, config_dir=config_copy, train_fn=FakeTrain())
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)


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
