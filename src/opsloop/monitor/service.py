"""The monitoring service: `opsloop monitor serve` re-checks drift every few seconds.

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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import HTMLResponse, Response

from opsloop import __version__
from opsloop.bundle import BUNDLE_JSON
from opsloop.errors import (
    EmptyWindowError,
    MissingExtraError,
    OpsloopError,
    PredictionLogError,
)
from opsloop.monitor.evidently_report import write_html_report
from opsloop.monitor.metrics import MonitorMetrics
from opsloop.monitor.report import DEFAULT_MIN_SAMPLES, DriftReport, detect_drift
from opsloop.monitor.settings import DEFAULT_WINDOW, ENV_PREFIX, MonitorSettings
from opsloop.monitor.window import ReferenceData, Window, load_reference, window_from_log
from opsloop.predictions import default_log_url
from opsloop.service import check_port, logging_config

logger = logging.getLogger(__name__)


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
        self.metrics.set("min_samples", settings.min_samples)
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
        except EmptyWindowError as exc:  # too early for a verdict, not broken
            raise CheckFailedError("window_too_small", str(exc), 0) from exc
        except PredictionLogError as exc:
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
            write_html_report(latest.reference, latest.window, path, report=latest.report)
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
        except MissingExtraError as exc:  # an install choice, not a failure of this request
            return json_response({"error": str(exc)}, 501)
        except OpsloopError as exc:  # e.g. the report directory is not writable
            return json_response({"error": str(exc)}, 503)
        if path is None:
            error = monitor.health()["last_error"] or "no drift check has run yet"
            return json_response({"error": error}, 503)
        return HTMLResponse(path.read_text(encoding="utf-8"))

    return app


def resolve_sources(
    bundle: Path | None, predlog_url: str | None, overrides: Sequence[str] = ()
) -> tuple[Path, str]:
    """The reference bundle and prediction log to watch: the arguments, else the defaults.

    The defaults are what `opsloop pipeline` and `opsloop serve` use: the champion's bundle that
    the pipeline materialises in the workspace (`registry.bundle_dir`/`registry.model_name` of the
    config `overrides` compose) and the server's log (`OPSLOOP_PREDLOG_URL`, else the workspace's
    `predictions.db`).
    """
    if bundle is None:
        from opsloop.config import load_config
        from opsloop.workspace import Workspace

        cfg = load_config(overrides)
        registry = cfg.registry
        bundle = Workspace(Path(cfg.workspace)).served_bundle(
            registry.bundle_dir, registry.model_name
        )
    return bundle, predlog_url or default_log_url()


def check_once(
    bundle: Path,
    predlog_url: str,
    *,
    last: int | None = None,
    since_seconds: float | None = None,
    alpha: float = 0.05,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    html: Path | None = None,
) -> DriftReport:
    """One drift check of the log's last `last` predictions (200 by default) and/or those of the
    last `since_seconds` seconds; with `html`, Evidently's report is written there too."""
    window = window_from_log(
        predlog_url,
        last=DEFAULT_WINDOW if last is None and since_seconds is None else last,
        since=None if since_seconds is None else time.time() - since_seconds,
    )
    reference = load_reference(bundle)
    report = detect_drift(reference, window, alpha=alpha, min_samples=min_samples)
    if html is not None:
        write_html_report(reference, window, html, report=report)
    return report


def run_monitor_service(settings: MonitorSettings, overrides: Sequence[str] = ()) -> None:
    """Serve the monitor until interrupted (SIGINT/SIGTERM); `overrides` pick the default bundle."""
    import uvicorn

    check_port(settings.host, settings.port, f"{ENV_PREFIX}PORT")
    bundle_path, predlog_url = resolve_sources(
        settings.bundle_path, settings.predlog_url, overrides
    )
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
