"""Serving settings from `OPSLOOP_*` environment variables (pydantic-settings), checked at start-up.

With nothing set, `opsloop serve` serves the local registry's `champion` of model `digits-cnn` on
127.0.0.1:8000 and logs every prediction to `<workspace>/predictions.db`. Set `OPSLOOP_BUNDLE_PATH`
to serve an exported bundle directory instead. A bad value fails start-up with one line naming the
variable and how to fix it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator

from opsloop.predictions import LOG_OFF as PREDLOG_OFF
from opsloop.predictions import EngineOptions
from opsloop.service import COMMON_HINTS, ServiceSettings, settings_config, settings_error
from opsloop.workspace import Workspace

if TYPE_CHECKING:
    from opsloop.serve.ingest import Retention

ENV_PREFIX = "OPSLOOP_"
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")

# What to tell the user when a variable is rejected, beyond pydantic's own reason.
HINTS = COMMON_HINTS | {
    "workers": "use 1 or more worker processes (about one per CPU core)",
    "max_batch_size": "use 1 (no batching) up to 1024",
    "max_batch_wait_ms": "use 0 (only batch what is already queued) up to 1000",
    "max_payload_bytes": "use a byte count of at least 1024",
    "max_request_rows": "use 1 or more rows per request",
    "predlog_url": f"use a SQLAlchemy URL such as sqlite:///predictions.db, or '{PREDLOG_OFF}'",
    "journal_max_bytes": "use a byte count of at least 1048576 (1 MiB)",
    "journal_dir": "use a writable directory (each server needs its own)",
    "predlog_sample": "use a share of requests above 0 and at most 1 (1 logs every request)",
    "predlog_retention_hours": "use a positive number of hours, or leave it unset to keep all",
    "predlog_max_rows": "use 1 or more rows, or leave it unset to keep all",
    "predlog_pool_size": "use 1 or more connections per worker process",
    "predlog_pool_timeout_s": "use a positive number of seconds",
    "predlog_connect_timeout_s": "use a positive number of seconds (PostgreSQL rounds up to 2)",
    "reload_poll_seconds": "use 0 (never poll) or a positive number of seconds",
    "canary_fraction": "use a fraction of requests from 0 (off) to 1",
    "shadow_max_pending_rows": "use 1 or more rows",
    "shadow_batch_wait_ms": "use 0 (only batch what is already queued) up to 1000",
    "inference_thread": "use auto, true or false",
    "max_header_bytes": "use a byte count of at least 1024 (all request headers together)",
    "header_timeout_s": "use a positive number of seconds",
    "body_timeout_s": "use a positive number of seconds",
    "keep_alive_s": "use a positive number of seconds",
    "max_image_pixels": "use 1 or more pixels (width x height of a /predict upload)",
    "cors_origins": "use comma-separated origins such as https://app.example.com, or '*'",
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
    predlog_batch_rows: int = Field(2048, ge=1)
    predlog_flush_ms: float = Field(200, gt=0)
    # Every prediction is first appended to its worker's journal file (before the answer is
    # sent), then moved into the log by the ingester. None puts the journal in
    # <workspace>/.opsloop/journal/<port>. `journal_fsync` also survives a power loss (a disk
    # flush per journal write: one per micro-batch of answers); without it the page cache
    # survives any process being killed.
    journal_dir: Path | None = None
    journal_fsync: bool = False
    # While the database is away the journal grows on disk; beyond this many bytes new
    # predictions are dropped and counted in opsloop_predlog_dropped_rows_total.
    journal_max_bytes: int = Field(1024**3, ge=1024 * 1024)
    # Log only this share of requests (picked at random; each logged row records the share so
    # counts can be scaled back), and keep rows for at most this many hours and/or at most this
    # many examples, the oldest going first. None keeps everything.
    predlog_sample: float = Field(1.0, gt=0, le=1)
    predlog_retention_hours: float | None = Field(None, gt=0)
    predlog_max_rows: int | None = Field(None, ge=1)
    # Whether this process runs the ingester as a thread; `opsloop serve` runs one ingester
    # process for all its workers instead and sets this to false for them.
    ingest_in_process: bool = True
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
    # Shadow rows wait up to this long to batch with others (nobody waits for their answers, and
    # a full batch costs the model far less per row than one row does). Shadow only: a canary's
    # requests are answered by the candidate and batch like the champion's.
    shadow_batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    access_log: bool = False
    # ONNX Runtime runs in a thread beside the event loop (true), or on the loop itself (false:
    # no thread hand-off per batch, but the loop waits while the model runs). auto: on the loop
    # when a full batch takes under a millisecond at warm-up (a small model), else a thread.
    inference_thread: Literal["auto", "true", "false"] = "auto"
    ort_intra_op_threads: int = Field(1, ge=0, le=256)
    ort_inter_op_threads: int = Field(1, ge=0, le=256)
    reload_poll_seconds: float = Field(5.0, ge=0)
    # Prometheus multiprocess directory for several workers; None picks a fresh temporary one.
    metrics_dir: Path | None = None
    # --- Limits on hostile or broken clients (docs/serving.md, "Limits") ----------------------
    # Request headers over max_header_bytes are answered 431; headers not complete within
    # header_timeout_s of the connection (or of the request's first byte) and bodies not
    # complete within body_timeout_s of their headers are answered 408. Either way the
    # connection is closed. Enforced by `opsloop serve` (its uvicorn protocol, `serve.limits`).
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    # An idle keep-alive connection (no request in progress) is closed after this long.
    keep_alive_s: float = Field(5.0, gt=0)
    # /predict refuses (413) an image of more pixels, checked from its header before decoding.
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Browser pages on other origins allowed to call the API (comma-separated origins, or "*").
    # Empty: no CORS headers, so browsers refuse cross-origin calls, and a POST that carries a
    # foreign Origin header is refused (403) since form and blob posts need no preflight.
    cors_origins: str = ""

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in split_origins(value):
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return value

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return split_origins(self.cors_origins)

    @field_validator("inference_thread", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        """true/false in any of the spellings a boolean setting takes, or auto."""
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return "true"
        if text in ("0", "false", "no", "off"):
            return "false"
        return text

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

    def predlog_retention(self) -> Retention:
        """The log's retention rules (`predlog_retention_hours`, `predlog_max_rows`)."""
        from opsloop.serve.ingest import Retention

        hours = self.predlog_retention_hours
        return Retention(None if hours is None else hours * 3600.0, self.predlog_max_rows)

    def resolved_journal_dir(self) -> Path:
        """The journal directory, defaulting to one per port inside the workspace."""
        if self.journal_dir is not None:
            return self.journal_dir
        return Workspace(self.workspace).journal_dir(self.port)

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


def split_origins(value: str) -> tuple[str, ...]:
    """`OPSLOOP_CORS_ORIGINS` as origins, without blanks or a trailing slash."""
    return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())


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
