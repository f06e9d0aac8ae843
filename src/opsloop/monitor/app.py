"""The monitoring service's HTTP face: `/metrics`, `/drift`, `/drift/report`, `/quality`, `/health`.

`create_monitor_app(monitor)` wraps a `DriftMonitor` (opsloop.monitor.service) whose rounds run
every `OPSLOOP_MONITOR_INTERVAL_SECONDS` in the app's lifespan; `run_monitor_service(settings)`
serves it under uvicorn, as `opsloop monitor serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import HTMLResponse, Response

from opsloop import __version__
from opsloop.errors import MissingExtraError, OpsloopError, redact_url
from opsloop.monitor.report import finite
from opsloop.monitor.service import DriftMonitor, resolve_sources
from opsloop.monitor.settings import ENV_PREFIX, MonitorSettings
from opsloop.service import check_port, in_background, serve_app

logger = logging.getLogger(__name__)


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def create_monitor_app(monitor: DriftMonitor) -> FastAPI:
    """The service's ASGI app; its lifespan runs the periodic checks."""
    interval = monitor.settings.interval_seconds

    async def check_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(monitor.run_once)
            except Exception:  # a bug must not end the checks; it is logged with its traceback
                logger.exception("a monitoring round failed")
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "checking %s against %s every %gs",
            redact_url(monitor.predlog_url),  # a database URL may hold a password
            monitor.bundle_path,
            interval,
        )
        async with in_background(check_forever(), "drift-checks"):
            yield

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

    @app.get("/quality", tags=["monitoring"])
    async def quality() -> Response:
        """Online accuracy per model version and role (labels joined), challengers against the
        champion, the label-free estimate, and the rollback watch's last verdict.

        503 with `{"error": ...}` until the log could be read once.
        """
        report = monitor.quality
        if report is None:
            error = monitor.quality_error or "no quality check has run yet"
            return json_response({"error": error}, 503)
        body = report.to_dict()
        verdict = monitor.last_verdict
        body["watch"] = None if verdict is None else finite(dataclasses.asdict(verdict))
        return json_response(body)

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


def run_monitor_service(settings: MonitorSettings, overrides: Sequence[str] = ()) -> None:
    """Serve the monitor until interrupted (SIGINT/SIGTERM); `overrides` pick the default bundle."""
    check_port(settings.host, settings.port, f"{ENV_PREFIX}PORT")
    bundle_path, predlog_url = resolve_sources(
        settings.bundle_path, settings.predlog_url, overrides
    )
    monitor = DriftMonitor(settings, bundle_path, predlog_url)
    serve_app(create_monitor_app(monitor), settings)
