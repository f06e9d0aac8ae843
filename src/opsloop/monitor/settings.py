"""The monitoring service's settings, from `OPSLOOP_MONITOR_*` environment variables.

With nothing set, `opsloop monitor serve` checks the workspace's champion bundle against the
server's prediction log every minute on 127.0.0.1:8001. A bad value fails start-up with one line
naming the variable and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from opsloop.monitor.report import DEFAULT_MIN_SAMPLES
from opsloop.monitor.stats import CORRECTIONS
from opsloop.service import COMMON_HINTS, ServiceSettings, settings_config, settings_error

ENV_PREFIX = "OPSLOOP_MONITOR_"
DEFAULT_WINDOW = 200  # predictions per check
HINTS = COMMON_HINTS | {
    "interval_seconds": "use a positive number of seconds between checks",
    "window": "use 1 or more predictions",
    "window_seconds": "use a positive number of seconds, or unset it",
    "alpha": "use a significance level strictly between 0 and 1, e.g. 0.05",
    "min_samples": "use 1 or more predictions",
    "correction": f"use one of: {', '.join(CORRECTIONS)}",
    "accuracy_window": "use 1 or more predictions",
    "watch_margin": "use an accuracy margin in [0, 1), e.g. 0.02",
    "watch_min_labels": "use 1 or more labels",
    "watch_latency_factor": "use a factor above 1, e.g. 2",
}


class MonitorSettings(ServiceSettings):
    """Everything the monitoring service can be told, each from `OPSLOOP_MONITOR_<FIELD>`."""

    model_config = settings_config(ENV_PREFIX)

    port: int = Field(8001, ge=1, le=65535)
    # The reference bundle and the prediction log; unset, they default to the workspace's
    # champion bundle and the server's log (`opsloop.monitor.service.resolve_sources`).
    bundle_path: Path | None = None
    predlog_url: str | None = None
    interval_seconds: float = Field(60.0, gt=0)
    window: int = Field(DEFAULT_WINDOW, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)
    min_samples: int = Field(DEFAULT_MIN_SAMPLES, ge=1)
    correction: str = "holm"
    # Online quality (labels joined) over the last `accuracy_window` answers (or seconds).
    accuracy_window: int = Field(1000, ge=1)
    accuracy_window_seconds: float | None = Field(None, gt=0)
    # The rollback watch: with a registered model name, a promotion whose champion does worse
    # live than the previous one (see opsloop.monitor.watch) is moved back automatically.
    watch_model: str | None = None
    watch_margin: float = Field(0.02, ge=0, lt=1)
    watch_min_labels: int = Field(50, ge=1)
    watch_latency_factor: float = Field(2.0, gt=1)
    # Where the HTML report is rendered; None picks a fresh temporary directory.
    report_dir: Path | None = None

    @field_validator("correction")
    @classmethod
    def _known_correction(cls, value: str) -> str:
        if value not in CORRECTIONS:
            raise ValueError(f"unknown correction {value!r}")
        return value


def load_monitor_settings(**overrides: Any) -> MonitorSettings:
    """Read `OPSLOOP_MONITOR_*` (explicit `overrides` win), or raise a one-line ConfigError."""
    try:
        return MonitorSettings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc, ENV_PREFIX, HINTS) from exc
