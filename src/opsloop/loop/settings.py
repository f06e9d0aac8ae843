"""The loop's settings, from `OPSLOOP_LOOP_*` environment variables (pydantic-settings).

With nothing set, `opsloop loop serve` watches the workspace's prediction log every 30 s, retrains
`digits-cnn` on the base dataset plus the labelled production data when the champion's accuracy
drops, at most once per 10 minutes and 6 times a day, and keeps its history in
`<workspace>/loop.db`. A bad value fails start-up with one line naming the variable and the fix.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError

from opsloop.service import COMMON_HINTS, ServiceSettings, settings_config, settings_error

ENV_PREFIX = "OPSLOOP_LOOP_"
HINTS = COMMON_HINTS | {
    "interval_seconds": "use a positive number of seconds between decisions",
    "cooldown_seconds": "use 0 or more seconds between runs",
    "max_runs_per_day": "use 1 or more runs",
    "min_new_labels": "use 0 or more labelled predictions",
    "accuracy_drop": "use an accuracy in (0, 1), e.g. 0.1 for ten points",
    "target_accuracy": "use an accuracy in (0, 1], or unset it",
    "estimate_drop": "use an accuracy in (0, 1), e.g. 0.15",
    "runner": "use process, kubernetes or dispatch",
    "min_improvement": "use an accuracy in [0, 1), e.g. 0.01",
    "base_margin": "use an accuracy in [0, 1), e.g. 0.02",
}


class LoopSettings(ServiceSettings):
    """Everything the loop controller can be told, each from `OPSLOOP_LOOP_<FIELD>`."""

    model_config = settings_config(ENV_PREFIX)

    port: int = Field(8002, ge=1, le=65535)
    workspace: Path = Path()
    model_name: str = Field("digits-cnn", min_length=1)
    # Where the history and the lock live; default sqlite:///<workspace>/loop.db.
    db_url: str | None = None
    # The prediction log with the labels (default: the server's) and the monitor to poll (its
    # /quality and /drift); without a monitor the loop computes both from the log itself.
    predlog_url: str | None = None
    monitor_url: str | None = None
    interval_seconds: float = Field(30.0, gt=0)
    # Triggers: the champion's online accuracy (upper end of its interval) or its label-free
    # estimate this far below its test accuracy; drift (explains, acts only when act_on_drift);
    # a changed base dataset; a schedule.
    accuracy_drop: float = Field(0.10, gt=0, lt=1)
    # What the champion should reach; unset, the test accuracy its bundle records. Set it to keep
    # retraining on new labels while a shifted world still runs below it.
    target_accuracy: float | None = Field(None, gt=0, le=1)
    estimate_drop: float = Field(0.15, gt=0, lt=1)
    min_accuracy_labels: int = Field(50, ge=1)
    act_on_drift: bool = False
    schedule_seconds: float | None = Field(None, gt=0)
    # Limits.
    cooldown_seconds: float = Field(600.0, ge=0)
    max_runs_per_day: int = Field(6, ge=1)
    min_new_labels: int = Field(100, ge=0)
    # The retrain: Hydra overrides for `opsloop pipeline data=production ...`, and the gate.
    overrides: str = ""
    min_improvement: float = Field(0.01, ge=0, lt=1)
    base_margin: float = Field(0.02, ge=0, lt=1)
    # Where it runs: this machine, a Kubernetes Job, or a CI workflow dispatch.
    runner: Literal["process", "kubernetes", "dispatch"] = "process"
    kubectl: str = "kubectl"
    job_template: Path = Path("deploy/k8s/base/retrain.yaml")
    dispatch_url: str | None = None  # https://api.github.com/repos/OWNER/REPO/dispatches
    dispatch_token: SecretStr | None = None
    # Token for POST /run and POST /alerts (unset: loopback callers only).
    token: SecretStr | None = None

    @property
    def override_list(self) -> list[str]:
        """`overrides` split like a shell would, e.g. 'trainer.max_epochs=10 seed=1'."""
        return shlex.split(self.overrides)

    def resolved_db_url(self) -> str:
        from opsloop.loop.history import default_db_url

        return self.db_url or default_db_url(self.workspace)

    def resolved_predlog_url(self) -> str:
        from opsloop.predictions import default_log_url

        return self.predlog_url or default_log_url()


Runner = Literal["process", "kubernetes", "dispatch"]


def load_loop_settings(**overrides: Any) -> LoopSettings:
    """Read `OPSLOOP_LOOP_*` (explicit `overrides` win), or raise a one-line ConfigError."""
    try:
        return LoopSettings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc, ENV_PREFIX, HINTS) from exc
