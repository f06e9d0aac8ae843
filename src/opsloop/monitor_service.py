"""The monitoring service: `opsloop monitor --serve` re-checks drift every few seconds.

Every `OPSLOOP_MONITOR_INTERVAL_SECONDS` it reads the last `OPSLOOP_MONITOR_WINDOW` predictions of
the prediction log, runs `detect_drift` against the bundle's reference sample and publishes the
verdict: Prometheus gauges on `/metrics`, the latest report as JSON on `GET /drift` and Evidently's
HTML report on `GET /drift/report`. A window that is too small, a log that cannot be opened or a
bundle without reference data never stops it: it keeps the last good verdict, reports its own
health on `/metrics` and `/drift`, and tries again at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.responses import HTMLResponse, Response

from opsloop import __version__
from opsloop.bundle import BUNDLE_JSON
from opsloop.errors import ConfigError, MonitorError, OpsloopError
from opsloop.monitor import (
    CORRECTIONS,
    DEFAULT_MIN_SAMPLES,
    DriftReport,
    ReferenceData,
    Window,
    detect_drift,
    load_reference,
    window_from_log,
    write_html_report,
)

logger = logging.getLogger(__name__)

ENV_PREFIX = "OPSLOOP_MONITOR_"
DETECTORS = ("image_stats", "embedding", "softmax")
# Why a check failed, as the `reason` label of the failure metrics.
REASONS = ("no_reference", "log_unavailable", "window_too_small", "bad_window", "internal")
HINTS = {
    "port": "use a TCP port between 1 and 65535",
    "interval_seconds": "use a positive number of seconds between checks",
    "window": "use 1 or more predictions",
    "window_seconds": "use a positive number of seconds, or unset it",
    "alpha": "use a significance level strictly between 0 and 1, e.g. 0.05",
    "min_samples": "use 1 or more predictions",
    "correction": f"use one of: {', '.join(CORRECTIONS)}",
    "log_level": "use one of debug, info, warning, error",
}


class MonitorSettings(BaseSettings):
    """Everything the monitoring service can be told, each from `OPSLOOP_MONITOR_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=(), frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    # The reference bundle and the prediction log; the CLI fills in the same defaults as
    # `opsloop monitor` (the workspace's champion bundle, the server's log) when unset.
    bundle_path: Path | None = None
    predlog_url: str | None = None
    interval_seconds: float = Field(60.0, gt=0)
    window: int = Field(200, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)
    min_samples: int = Field(DEFAULT_MIN_SAMPLES, ge=1)
    correction: str = "holm"
    # Where the HTML report is rendered; None picks a fresh temporary directory.
    report_dir: Path | None = None
    log_level: str = "info"

    @field_validator("correction")
    @classmethod
    def _known_correction(cls, value: str) -> str:
        if value not in CORRECTIONS:
            raise ValueError(f"unknown correction {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"unknown log level {value!r}")
        return value.lower()


def load_monitor_settings(**overrides: Any) -> MonitorSettings:
    """Read `OPSLOOP_MONITOR_*` (explicit `overrides` win), or raise a one-line ConfigError."""
    try:
        return MonitorSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        reason = first["msg"].removeprefix("Value error, ")
        hint = HINTS.get(name, "fix or unset it")
        raise ConfigError(
            f"{ENV_PREFIX}{name.upper()}={first.get('input')!r} is invalid: {reason}; {hint}"
        ) from exc


class MonitorMetrics:
    """The service's Prometheus metrics, in a private registry per service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        nan = float("nan")  # no verdict before the first successful check
        self.drift = Gauge(
            "opsloop_drift_detected",
            "1 when the last successful check found drift, 0 when not; NaN before any",
            registry=registry,
        )
        self.score = Gauge(
            "opsloop_drift_score",
            "Largest share of drifted features of any detector (0..1), last successful check",
            registry=registry,
        )
        self.p_value = Gauge(
            "opsloop_drift_p_value",
            "Smallest multiple-testing corrected p-value, last successful check",
            registry=registry,
        )
        self.detector_drift = Gauge(
            "opsloop_drift_detector_detected",
            "1 when the detector fired in the last successful check",
            ["detector"],
            registry=registry,
        )
        self.detector_score = Gauge(
            "opsloop_drift_detector_score",
            "Share of the detector's features that drifted (0..1)",
            ["detector"],
            registry=registry,
        )
        self.detector_p_value = Gauge(
            "opsloop_drift_detector_p_value",
            "The detector's smallest corrected p-value",
            ["detector"],
            registry=registry,
        )
        self.window_size = Gauge(
            "opsloop_drift_window_size",
            "Predictions in the window of the last check (also when too small to check)",
            registry=registry,
        )
        self.min_samples = Gauge(
            "opsloop_drift_min_samples",
            "The smallest window that is checked at all",
            registry=registry,
        )
        self.mixed_versions = Gauge(
            "opsloop_drift_mixed_versions",
            "1 when the last checked window mixed model versions",
            registry=registry,
        )
        self.last_check = Gauge(
            "opsloop_drift_last_check_timestamp_seconds",
            "Unix time of the last check, successful or not",
            registry=registry,
        )
        self.last_success = Gauge(
            "opsloop_drift_last_success_timestamp_seconds",
            "Unix time of the last successful check (0 before any)",
            registry=registry,
        )
        self.duration = Gauge(
            "opsloop_drift_check_duration_seconds",
            "Seconds the last check took (reading the log and testing)",
            registry=registry,
        )
        self.healthy = Gauge(
            "opsloop_drift_monitor_healthy",
            "1 when the last check succeeded, 0 when it failed (see opsloop_drift_last_error)",
            registry=registry,
        )
        self.last_error = Gauge(
            "opsloop_drift_last_error",
            "1 for the reason the last check failed, 0 for the others",
            ["reason"],
            registry=registry,
        )
        self.checks = Counter(
            "opsloop_drift_checks", "Drift checks by outcome", ["outcome"], registry=registry
        )
        self.failures = Counter(
            "opsloop_drift_check_failures",
            "Failed drift checks by reason",
            ["reason"],
            registry=registry,
        )
        for gauge in (self.drift, self.score, self.p_value, self.window_size):
            gauge.set(nan)
        for detector in DETECTORS:
            for labelled in (self.detector_drift, self.detector_score, self.detector_p_value):
                labelled.labels(detector).set(nan)
        for reason in REASONS:
            self.last_error.labels(reason).set(0)
            self.failures.labels(reason)
        for outcome in ("ok", "failed"):
            self.checks.labels(outcome)
        self.healthy.set(0)
        self.last_success.set(0)

    def record_success(self, report: DriftReport, seconds: float) -> None:
        self.drift.set(int(report.drift))
        self.score.set(report.score)
        self.p_value.set(report.p_value)
        for detector in report.detectors:
            self.detector_drift.labels(detector.name).set(int(detector.drift))
            self.detector_score.labels(detector.name).set(detector.score)
            self.detector_p_value.labels(detector.name).set(detector.p_value)
        self.window_size.set(report.window_size)
        self.mixed_versions.set(int(report.mixed_versions))
        self.checks.labels("ok").inc()
        self.healthy.set(1)
        for reason in REASONS:
            self.last_error.labels(reason).set(0)
        now = time.time()
        self.last_check.set(now)
        self.last_success.set(now)
        self.duration.set(seconds)

    def record_failure(self, reason: str, seconds: float, window_size: int | None) -> None:
        if window_size is not None:
            self.window_size.set(window_size)
        self.checks.labels("failed").inc()
        self.failures.labels(reason).inc()
        self.healthy.set(0)
        for known in REASONS:
            self.last_error.labels(known).set(int(known == reason))
        self.last_check.set(time.time())
        self.duration.set(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CheckFailedError(OpsloopError):
    """A drift check could not run; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str, window_size: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.window_size = window_size


@dataclass(frozen=True)
class CheckResult:
    """The last successful check: its report and the window it judged (for the HTML report)."""

    number: int
    report: DriftReport
    window: Window
    reference: ReferenceData


class DriftMonitor:
    """Runs checks and keeps the last verdict and the service's health; thread-safe."""

    def __init__(self, settings: MonitorSettings, bundle_path: Path, predlog_url: str) -> None:
        self.settings = settings
        self.bundle_path = bundle_path
        self.predlog_url = predlog_url
        self.metrics = MonitorMetrics()
        self.metrics.min_samples.set(settings.min_samples)
        self.reference: ReferenceData | None = None
        self._reference_stamp: int | None = None
        self.latest: CheckResult | None = None
        self.checks = 0
        self.last_error: str | None = None
        self.last_reason: str | None = None
        self.last_check_at: float | None = None
        self._lock = threading.Lock()
        self._html_lock = threading.Lock()
        self._html: tuple[int, Path] | None = None
        self._report_dir = settings.report_dir

    def check(self) -> DriftReport | None:
        """One check: the report, or None when it failed (the failure is recorded, not raised)."""
        started = time.perf_counter()
        with self._lock:
            self.checks += 1
            number = self.checks
        try:
            reference = self._reference()
            window = self._window()
            report = self._detect(reference, window)
        except CheckFailedError as exc:
            self._failed(exc.reason, str(exc), time.perf_counter() - started, exc.window_size)
            return None
        except Exception as exc:  # a bug must not stop the monitor; it shows on /metrics
            logger.exception("drift check failed unexpectedly")
            message = f"unexpected {type(exc).__name__}: {exc}"
            self._failed("internal", message, time.perf_counter() - started, None)
            return None
        seconds = time.perf_counter() - started
        with self._lock:
            self.latest = CheckResult(number, report, window, reference)
            self.last_error = self.last_reason = None
            self.last_check_at = time.time()
            self.metrics.record_success(report, seconds)
        logger.info(
            "drift check %d: %s over %d predictions (fired: %s) in %.2fs",
            number,
            "DRIFT" if report.drift else "no drift",
            report.window_size,
            ", ".join(report.fired) or "none",
            seconds,
        )
        return report

    def _reference(self) -> ReferenceData:
        """The bundle's reference, reloaded when its bundle.json changes (a new export)."""
        try:
            stamp = (self.bundle_path / BUNDLE_JSON).stat().st_mtime_ns
        except OSError:
            stamp = None
        if self.reference is None or stamp != self._reference_stamp:
            try:
                self.reference = load_reference(self.bundle_path)
            except OpsloopError as exc:
                self.reference = None
                raise CheckFailedError("no_reference", str(exc)) from exc
            self._reference_stamp = stamp
            logger.info("loaded the reference sample of %s", self.bundle_path)
        return self.reference

    def _window(self) -> Window:
        settings = self.settings
        since = None if settings.window_seconds is None else time.time() - settings.window_seconds
        try:
            return window_from_log(self.predlog_url, last=settings.window, since=since)
        except OpsloopError as exc:
            if "has no predictions" in str(exc):  # an empty window: too small, not broken
                raise CheckFailedError("window_too_small", str(exc), 0) from exc
            raise CheckFailedError("log_unavailable", str(exc)) from exc

    def _detect(self, reference: ReferenceData, window: Window) -> DriftReport:
        settings = self.settings
        if len(window) < settings.min_samples:
            raise CheckFailedError(
                "window_too_small",
                f"the window has {len(window)} predictions, fewer than the minimum "
                f"{settings.min_samples}; waiting for more traffic (or lower "
                f"{ENV_PREFIX}MIN_SAMPLES)",
                len(window),
            )
        try:
            return detect_drift(
                reference,
                window,
                alpha=settings.alpha,
                min_samples=settings.min_samples,
                correction=settings.correction,
            )
        except OpsloopError as exc:
            raise CheckFailedError("bad_window", str(exc), len(window)) from exc

    def _failed(self, reason: str, message: str, seconds: float, window_size: int | None) -> None:
        with self._lock:
            self.last_error, self.last_reason = message, reason
            self.last_check_at = time.time()
            self.metrics.record_failure(reason, seconds, window_size)
        logger.warning("drift check failed (%s): %s", reason, message)

    def health(self) -> dict[str, Any]:
        """The service's own state, for `/drift` and `/health`."""
        with self._lock:
            return {
                "healthy": self.last_reason is None and self.latest is not None,
                "checks": self.checks,
                "last_check_at": self.last_check_at,
                "last_error": self.last_error,
                "last_error_reason": self.last_reason,
                "last_report_check": None if self.latest is None else self.latest.number,
                "interval_seconds": self.settings.interval_seconds,
                "window": self.settings.window,
                "min_samples": self.settings.min_samples,
                "bundle": str(self.bundle_path),
            }

    def html_report(self) -> Path | None:
        """Evidently's HTML report of the latest successful check, rendered once per check."""
        latest = self.latest
        if latest is None:
            return None
        with self._html_lock:
            if self._html is not None and self._html[0] == latest.number:
                return self._html[1]
            if self._report_dir is None:
                self._report_dir = Path(tempfile.mkdtemp(prefix="opsloop-monitor-"))
            path = self._report_dir / "drift-report.html"
            try:
                write_html_report(latest.reference, latest.window, path, report=latest.report)
            except ImportError as exc:
                raise MonitorError(
                    f"the HTML report needs Evidently ({exc}); install the `monitor` extra"
                ) from exc
            self._html = (latest.number, path)
            return path


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def create_monitor_app(monitor: DriftMonitor) -> FastAPI:
    """The service's ASGI app; its lifespan runs the periodic checks."""
    interval = monitor.settings.interval_seconds

    async def check_forever() -> None:
        while True:
            await asyncio.to_thread(monitor.check)
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(check_forever(), name="drift-checks")
        logger.info(
            "checking %s against %s every %gs",
            monitor.predlog_url,
            monitor.bundle_path,
            interval,
        )
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="opsloop drift monitor",
        version=__version__,
        description="Periodic drift checks of the prediction log against the bundle's reference.",
        lifespan=lifespan,
    )

    @app.get("/health", tags=["monitoring"])
    async def health() -> Response:
        """The process is up; the body says whether the last check succeeded."""
        return json_response(monitor.health())

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: the verdict per detector, the window and the monitor's health."""
        return Response(monitor.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/drift", tags=["monitoring"])
    async def drift() -> Response:
        """The latest successful report (top-level boolean `drift`) and the monitor's health.

        503 with `{"error": ...}` until a check has succeeded.
        """
        latest = monitor.latest
        state = monitor.health()
        if latest is None:
            error = state["last_error"] or "no drift check has run yet"
            return json_response({"error": error, "monitor": state}, 503)
        return json_response(latest.report.to_dict() | {"monitor": state})

    @app.get("/drift/report", tags=["monitoring"], response_class=HTMLResponse)
    async def drift_report() -> Response:
        """Evidently's HTML report of the latest successful check (rendered on first request)."""
        try:
            path = await asyncio.to_thread(monitor.html_report)
        except OpsloopError as exc:
            return json_response({"error": str(exc)}, 500)
        if path is None:
            error = monitor.health()["last_error"] or "no drift check has run yet"
            return json_response({"error": error}, 503)
        return HTMLResponse(path.read_text(encoding="utf-8"))

    return app


def run_monitor_service(settings: MonitorSettings, bundle_path: Path, predlog_url: str) -> None:
    """Serve the monitor until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    from opsloop.serve.server import logging_config, make_socket

    try:
        make_socket(settings.host, settings.port).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}; set "
            f"{ENV_PREFIX}PORT (or --port) to a free port"
        ) from exc
    monitor = DriftMonitor(settings, bundle_path, predlog_url)
    uvicorn.run(
        create_monitor_app(monitor),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level),
        access_log=False,
        server_header=False,
    )
