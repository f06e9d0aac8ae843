"""The app's settings, from `OPSLOOP_UI_*` environment variables (pydantic-settings).

With nothing set, `opsloop ui` listens on 127.0.0.1:8501 and shows the workspace in the current
directory: the server at http://127.0.0.1:8000, the registry in `./mlflow.db`, the prediction log
in `./predictions.db`, the loop history in `./loop.db` and the champion bundle in
`./bundles/digits-cnn`, exactly where `make run`, `opsloop serve` and `opsloop loop` put them. A
store's own variable (`OPSLOOP_TRACKING_URI`, `OPSLOOP_PREDLOG_URL`, `OPSLOOP_LOOP_DB_URL`) is
followed when the app's is unset, so one environment configures the whole stack.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator

from opsloop.service import COMMON_HINTS, ServiceSettings, settings_config, settings_error
from opsloop.workspace import Workspace

ENV_PREFIX = "OPSLOOP_UI_"
DEFAULT_PORT = 8501  # Streamlit's own default, so its docs and habits carry over
HINTS = COMMON_HINTS | {
    "server_url": "use the inference server's base URL, e.g. http://127.0.0.1:8000",
    "monitor_url": "use the monitor's base URL, e.g. http://127.0.0.1:8001, or 'none'",
    "timeout_seconds": "use a positive number of seconds",
    "window": "use 1 or more predictions",
    "drift_window": "use 2 or more predictions per drift check",
    "alpha": "use a significance level strictly between 0 and 1, e.g. 0.05",
}
OFF = "none"


class UISettings(ServiceSettings):
    """Everything the app can be told, each from `OPSLOOP_UI_<FIELD>`."""

    model_config = settings_config(ENV_PREFIX)

    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    workspace: Path = Path()
    # The inference server (V2 protocol) and the model name it serves.
    server_url: str = "http://127.0.0.1:8000"
    model_name: str = Field("digits-cnn", min_length=1)
    # Labels posted to /feedback carry this bearer token when the server asks for one.
    feedback_token: SecretStr | None = None
    # The monitoring service, for its latest verdict; "none" leaves it out.
    monitor_url: str = "http://127.0.0.1:8001"
    timeout_seconds: float = Field(10.0, gt=0)
    # The stores; unset, each store's own variable, else the workspace's embedded default.
    tracking_uri: str | None = None
    predlog_url: str | None = None
    loop_db_url: str | None = None
    # The reference bundle for drift and the sample images; unset, the workspace's champion.
    bundle_path: Path | None = None
    # Monitoring: how many recent predictions to read, and how many each drift check judges.
    window: int = Field(2000, ge=1)
    drift_window: int = Field(200, ge=2)
    alpha: float = Field(0.05, gt=0, lt=1)

    @field_validator("server_url", "monitor_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value == OFF or value.startswith(("http://", "https://")):
            return value.rstrip("/")
        raise ValueError(f"not an http(s) URL: {value!r}")

    @property
    def monitor_enabled(self) -> bool:
        return self.monitor_url != OFF

    def resolved_tracking_uri(self) -> str:
        """The registry: this app's setting, `OPSLOOP_TRACKING_URI`, else the workspace's."""
        from_env = os.environ.get("OPSLOOP_TRACKING_URI", "").strip()
        if self.tracking_uri:
            return self.tracking_uri
        if from_env:
            return from_env
        return f"sqlite:///{self.workspace.expanduser().resolve() / 'mlflow.db'}"

    def resolved_predlog_url(self) -> str:
        """The prediction log: this app's setting, `OPSLOOP_PREDLOG_URL`, else the workspace's."""
        from opsloop.predictions import LOG_OFF, PREDLOG_URL_ENV

        from_env = os.environ.get(PREDLOG_URL_ENV, "").strip()
        if self.predlog_url:
            return self.predlog_url
        if from_env and from_env != LOG_OFF:
            return from_env
        return Workspace(self.workspace).predictions_url

    def resolved_loop_db_url(self) -> str:
        """The loop history: this app's setting, `OPSLOOP_LOOP_DB_URL`, else the workspace's."""
        from opsloop.loop.history import default_db_url

        from_env = os.environ.get("OPSLOOP_LOOP_DB_URL", "").strip()
        if self.loop_db_url:
            return self.loop_db_url
        if from_env:
            return from_env
        return default_db_url(self.workspace)

    def resolved_bundle_path(self) -> Path:
        """The reference bundle: this app's setting, else the one `make run` materialises."""
        if self.bundle_path is not None:
            return self.bundle_path
        # registry.bundle_dir's default; a workspace that moved it sets OPSLOOP_UI_BUNDLE_PATH.
        return Workspace(self.workspace).served_bundle("bundles", self.model_name)


def load_ui_settings(**overrides: Any) -> UISettings:
    """Read `OPSLOOP_UI_*` (explicit `overrides` win), or raise a one-line ConfigError."""
    try:
        return UISettings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc, ENV_PREFIX, HINTS) from exc


@functools.lru_cache(maxsize=1)
def get_settings() -> UISettings:
    """The process's settings, read once from the environment."""
    return load_ui_settings()
