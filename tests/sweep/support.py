"""Helpers shared by the sweep tests: sweep configs, and a stand-in for training.

`FakeTrain` stands in for `train_model`: it drives the real callbacks through a made-up loss
curve, so a whole sweep runs in well under a second without training anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import optuna

from opsloop.config import OpsloopConfig, ParamSpec
from tests.support import make_config


def sweep_config(workspace: Path, *overrides: str) -> OpsloopConfig:
    """The real config with the default search space, untracked, writing into `workspace`."""
    return make_config(workspace, f"workspace={workspace}", "logger=none", *overrides)


def with_params(cfg: OpsloopConfig, **params: ParamSpec) -> OpsloopConfig:
    """`cfg` with a search space whose keys are config paths (`optim__lr` -> `optim.lr`)."""
    space = {key.replace("__", "."): spec for key, spec in params.items()}
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, params=space))


def with_logger(cfg: OpsloopConfig, name: str, study: str) -> OpsloopConfig:
    return dataclasses.replace(
        cfg,
        logger=dataclasses.replace(cfg.logger, name=name),
        sweep=dataclasses.replace(cfg.sweep, study_name=study),
    )


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
