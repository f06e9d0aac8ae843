"""The loop controller as a service: `opsloop loop serve`.

Every `OPSLOOP_LOOP_INTERVAL_SECONDS` it takes one decision (`Controller.step`); `POST /alerts`
takes Alertmanager's webhook, so an accuracy or drift alert starts a decision at once; `POST /run`
asks for one by hand. `GET /history` lists the runs, `GET /metrics` exports them for Prometheus
(`opsloop_loop_runs_total{trigger, outcome}`, the last run's time per outcome, a running gauge),
read from the loop database, so they survive restarts and count runs made anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.responses import Response

from opsloop import __version__
from opsloop.loop.controller import Controller
from opsloop.loop.history import RUNNING, History
from opsloop.loop.settings import ENV_PREFIX, LoopSettings
from opsloop.loop.triggers import ALERT, MANUAL, Trigger
from opsloop.service import check_port, in_background, serve_app

logger = logging.getLogger(__name__)

# The alerts (deploy/prometheus/alerts.yml) that start a decision when Alertmanager posts them.
ACTIONABLE_ALERTS = frozenset(
    {"OpsloopOnlineAccuracyDrop", "OpsloopEstimatedAccuracyDrop", "OpsloopDriftDetected"}
)


class HistoryCollector:
    """Prometheus metrics computed from the loop database at every scrape."""

    def __init__(self, history: History, controller: Controller) -> None:
        self.history = history
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "opsloop_loop_runs", "Loop runs and recorded decisions", labels=["trigger", "outcome"]
        )
        for (trigger, state), count in sorted(self.history.counts().items()):
            runs.add_metric([trigger, state], count)
        yield runs
        last = GaugeMetricFamily(
            "opsloop_loop_last_run_timestamp_seconds",
            "Unix time the last run with this outcome ended",
            labels=["outcome"],
        )
        finished: dict[str, float] = {}
        for run in self.history.recent(200):
            if run.finished_at is not None and run.state not in finished:
                finished[run.state] = run.finished_at
        for state, at in sorted(finished.items()):
            last.add_metric([state], at)
        yield last
        yield GaugeMetricFamily(
            "opsloop_loop_running",
            "Loop runs in progress",
            value=len(self.history.in_state(RUNNING)),
        )
        yield CounterMetricFamily(
            "opsloop_loop_skipped_decisions",
            "Decisions on a fired trigger that a limit held back, by this controller",
            value=self.controller.skipped,
        )


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content, default=str), status, media_type="application/json")


def alert_trigger(payload: Any) -> Trigger | None:
    """The trigger an Alertmanager webhook carries: its firing actionable alerts, or None."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        return None
    firing = [
        alert
        for alert in payload["alerts"]
        if isinstance(alert, dict)
        and alert.get("status", payload.get("status")) == "firing"
        and alert.get("labels", {}).get("alertname") in ACTIONABLE_ALERTS
    ]
    if not firing:
        return None
    names = sorted({alert["labels"]["alertname"] for alert in firing})
    evidence = {
        "alerts": [
            {
                "labels": alert.get("labels", {}),
                "annotations": alert.get("annotations", {}),
                "startsAt": alert.get("startsAt"),
            }
            for alert in firing
        ]
    }
    return Trigger(ALERT, f"Alertmanager: {', '.join(names)} firing", evidence)


def create_loop_app(controller: Controller) -> FastAPI:
    """The service's ASGI app; its lifespan runs the periodic decisions."""
    settings = controller.settings
    busy = asyncio.Lock()  # one decision at a time in this process

    async def decide(request: Trigger | None = None) -> None:
        async with busy:
            try:
                await asyncio.to_thread(controller.step, request)
            except Exception:  # a failed decision is logged; the loop keeps deciding
                logger.exception("a loop decision failed")

    async def decide_forever() -> None:
        while True:
            await decide()
            await asyncio.sleep(settings.interval_seconds)

    background: set[asyncio.Task[None]] = set()

    def soon(request: Trigger) -> None:
        task = asyncio.create_task(decide(request))
        background.add(task)
        task.add_done_callback(background.discard)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "loop: a decision every %gs on %s", settings.interval_seconds, settings.model_name
        )
        try:
            async with in_background(decide_forever(), "loop-decisions"):
                yield
        finally:
            controller.close()

    app = FastAPI(
        title="opsloop loop",
        version=__version__,
        description="The closed loop: triggers, limits, retrain runs and their history.",
        lifespan=lifespan,
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HistoryCollector(controller.history, controller))

    def authorised(request: Request) -> bool:
        if settings.token is None:
            host = request.client.host if request.client else ""
            return host in ("127.0.0.1", "::1", "localhost", "testclient")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = settings.token.get_secret_value().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected)

    @app.get("/health", tags=["loop"])
    async def health() -> Response:
        """The process is up; the last evidence it decided on."""
        evidence = controller.last_evidence
        return json_response(
            {"live": True, "evidence": None if evidence is None else evidence.as_dict()}
        )

    @app.get("/metrics", tags=["loop"], response_class=Response)
    async def metrics() -> Response:
        """Runs by trigger and outcome, the last run per outcome, runs in progress."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/history", tags=["loop"])
    async def history(limit: int = 50) -> Response:
        """The newest runs and recorded decisions, newest first."""
        runs = await asyncio.to_thread(controller.history.recent, max(1, min(limit, 500)))
        return json_response([dataclasses.asdict(run) for run in runs])

    @app.post("/alerts", tags=["loop"], status_code=202)
    async def alerts(request: Request) -> Response:
        """Alertmanager's webhook: firing accuracy or drift alerts start a decision now."""
        if not authorised(request):
            return json_response({"error": "send 'Authorization: Bearer <token>'"}, 401)
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return json_response({"error": f"malformed JSON: {exc}"}, 400)
        trigger = alert_trigger(payload)
        if trigger is None:
            return json_response({"accepted": False, "reason": "no actionable alert firing"}, 202)
        soon(trigger)
        return json_response({"accepted": True, "trigger": trigger.reason}, 202)

    @app.post("/run", tags=["loop"], status_code=202)
    async def run(request: Request, reason: str = "requested over HTTP") -> Response:
        """Ask for a decision now (a manual trigger; the limits still apply)."""
        if not authorised(request):
            return json_response({"error": "send 'Authorization: Bearer <token>'"}, 401)
        soon(Trigger(MANUAL, reason))
        return json_response({"accepted": True}, 202)

    return app


def run_loop_service(settings: LoopSettings) -> None:
    """Serve the loop until interrupted (SIGINT/SIGTERM)."""
    check_port(settings.host, settings.port, f"{ENV_PREFIX}PORT")
    controller = Controller(settings)
    controller.recover()
    serve_app(create_loop_app(controller), settings)
