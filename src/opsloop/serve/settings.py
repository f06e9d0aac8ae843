"""Serving settings from `OPSLOOP_*` environment variables (pydantic-settings), checked at start-up.

With nothing set, `opsloop serve` serves the local registry's `champion` of model `digits-cnn` on
127.0.0.1:8000 and logs every prediction to `<workspace>/predictions.db`. Set `OPSLOOP_BUNDLE_PATH`
to serve an exported bundle directory instead. A bad value fails start-up with one line naming the
variable and how to fix it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator

from opsloop.predictions import LOG_OFF as PREDLOG_OFF
from opsloop.predictions import EngineOptions
from opsloop.service import COMMON_HINTS, ServiceSettings, settings_config, settings_error
from opsloop.workspace import Workspace

ENV_PREFIX = "OPSLOOP_"

# What to tell the user when a variable is rejected, beyond pydantic's own reason.
HINTS = COMMON_HINTS | {
    "workers": "use 1 or more worker processes (about one per CPU core)",
    "max_batch_size": "use 1 (no batching) up to 1024",
    "max_batch_wait_ms": "use 0 (only batch what is already queued) up to 1000",
    "max_payload_bytes": "use a byte count of at least 1024",
    "max_request_rows": "use 1 or more rows per request",
    "predlog_url": f"use a SQLAlchemy URL such as sqlite:///predictions.db, or '{PREDLOG_OFF}'",
    "predlog_max_buffered_rows": "use 1 or more rows (kept in memory while the database is away)",
    "predlog_pool_size": "use 1 or more connections per worker process",
    "predlog_pool_timeout_s": "use a positive number of seconds",
    "predlog_connect_timeout_s": "use a positive number of seconds (PostgreSQL rounds up to 2)",
    "reload_poll_seconds": "use 0 (never poll) or a positive number of seconds",
    "canary_fraction": "use a fraction of requests from 0 (off) to 1",
    "shadow_max_pending_rows": "use 1 or more rows",
}


class ServeSettings(ServiceSettings):
    """Everything `opsloop serve` can be told, each field read from `OPSLOOP_<FIELD>`."""

    model_config = settings_config(ENV_PREFIX)

    workers: int = Field(1, ge=1, le=64)
    workspace: Path = Path()
    # Which model: an exported bundle directory, else the registry's `model_name@model_alias`.
    bundle_path: Path | None = None
    model_name: str = Field("digits-cnn", min_length=1)
    model_alias: str = Field("champion", min_length=1)
    # Micro-batching: requests queued within `max_batch_wait_ms` share one ONNX Runtime call.
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_batch_wait_ms: float = Field(0.0, ge=0, le=1000)
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_request_rows: int = Field(1024, ge=1)
    # Prediction log: a SQLAlchemy URL; None means SQLite in the workspace, "none" switches it off.
    predlog_url: str | None = None
    predlog_batch_rows: int = Field(512, ge=1)
    predlog_flush_ms: float = Field(200, gt=0)
    # While the database is away, rows wait in memory (retried with back-off); beyond this many
    # the oldest are dropped and counted in opsloop_predlog_dropped_rows_total.
    predlog_max_buffered_rows: int = Field(100_000, ge=1)
    # A server database's (PostgreSQL's) connections per worker process, and how long to wait
    # for a free one and for the server to accept a new one. SQLite ignores them.
    predlog_pool_size: int = Field(2, ge=1)
    predlog_pool_timeout_s: float = Field(10.0, gt=0)
    predlog_connect_timeout_s: float = Field(5.0, gt=0)
    admin_token: SecretStr | None = None
    # Labels posted to /feedback must carry `Authorization: Bearer <token>` when this is set.
    feedback_token: SecretStr | None = None
    # The candidate: a second model, by default the registry's `model_name@candidate_alias` (or
    # the bundle at candidate_bundle_path). `shadow` runs it on every request off the response
    # path and logs its answers (role=shadow); `canary_fraction` of the requests, picked by a
    # hash of the request id (so a client's retries stick), are answered by it (role=canary).
    shadow: bool = False
    canary_fraction: float = Field(0.0, ge=0, le=1)
    candidate_alias: str = Field("challenger", min_length=1)
    candidate_bundle_path: Path | None = None
    # Shadow work waiting for the candidate beyond this many rows is skipped (and counted), so
    # a slow candidate can never slow the answers down or grow memory without bound.
    shadow_max_pending_rows: int = Field(1024, ge=1)
    access_log: bool = False
    # ONNX Runtime runs in a thread beside the event loop (true), or on the loop itself (false:
    # less overhead for a tiny model when every core already runs a worker).
    inference_thread: bool = True
    ort_intra_op_threads: int = Field(1, ge=0, le=256)
    ort_inter_op_threads: int = Field(1, ge=0, le=256)
    reload_poll_seconds: float = Field(5.0, ge=0)
    # Prometheus multiprocess directory for several workers; None picks a fresh temporary one.
    metrics_dir: Path | None = None

    @field_validator("predlog_url")
    @classmethod
    def _parsable_url(cls, value: str | None) -> str | None:
        if value is None or value == PREDLOG_OFF:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        return value

    @property
    def predlog_enabled(self) -> bool:
        return self.predlog_url != PREDLOG_OFF

    def predlog_engine_options(self) -> EngineOptions:
        """The prediction log's connection pool and timeouts (a server database's)."""
        return EngineOptions(
            pool_size=self.predlog_pool_size,
            pool_timeout_s=self.predlog_pool_timeout_s,
            connect_timeout_s=self.predlog_connect_timeout_s,
        )

    def resolved_predlog_url(self) -> str:
        """The prediction-log URL, defaulting to SQLite beside the workspace's other stores."""
        if self.predlog_url is not None:
            return self.predlog_url
        return Workspace(self.workspace).predictions_url

    @property
    def candidate_enabled(self) -> bool:
        return self.shadow or self.canary_fraction > 0

    def describe_source(self) -> str:
        """Where the served model comes from, for logs and messages."""
        if self.bundle_path is not None:
            return f"bundle {self.bundle_path}"
        return f"registry model {self.model_name}@{self.model_alias}"


def load_settings(**overrides: Any) -> ServeSettings:
    """Read `OPSLOOP_*` (explicit `overrides` win) and validate, or raise a one-line ConfigError."""
    try:
        return ServeSettings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc, ENV_PREFIX, HINTS) from exc


@functools.lru_cache(maxsize=1)
def get_settings() -> ServeSettings:
    """The process's settings, read once from the environment."""
    return load_settings()
