"""The HTTP API: `create_app(settings)` wires the FastAPI app that `opsloop serve` runs.

The routes are in `routes`, the hot infer path in `fastpath` (on the connection itself under
`opsloop serve`, see `wire`; otherwise in front of FastAPI's routing),
request counting in `middleware`, the shared state in `state`, the `/docs` additions in `openapi`.
Here: the lifespan (the bundle is loaded there), the error handlers and the middleware order
(with `cors` for browser pages of other origins when `OPSLOOP_CORS_ORIGINS` lists them).
Bad input is a 4xx (or 503 while no model is loaded) with `{"error": "..."}`, never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from opsloop import __version__
from opsloop.serve.cors import with_cors
from opsloop.serve.fastpath import InferCalls, InferFastPath
from opsloop.serve.middleware import CLIENT_GONE, UNMATCHED, CountRequests, RecordStatus
from opsloop.serve.openapi import install_openapi
from opsloop.serve.protocol import RequestError
from opsloop.serve.routes import JSONBytes, router
from opsloop.serve.settings import ServeSettings, get_settings
from opsloop.serve.source import ModelSource, candidate_source, source_from_settings
from opsloop.serve.state import AppState, build_state

logger = logging.getLogger(__name__)


def create_app(
    settings: ServeSettings | None = None,
    *,
    source: ModelSource | None = None,
    candidate: ModelSource | None = None,
) -> ServeApp:
    """The serving app for `settings` (default: the environment's); `source` and `candidate`
    override where the champion and the candidate (shadow/canary) come from."""
    settings = settings or get_settings()
    state = build_state(
        settings,
        source or source_from_settings(settings),
        candidate if candidate is not None else candidate_source(settings),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.close()  # every queued request is answered, then everything is logged

    app = ServeApp(
        title="opsloop inference API",
        version=__version__,
        description="Open Inference Protocol (KServe V2) over an ONNX model bundle, plus "
        '`POST /predict` for image files. Errors are `{"error": "..."}`.',
        lifespan=lifespan,
        default_response_class=JSONBytes,
    )
    app.state.serve = state  # what `get_state` hands the routes
    add_exception_handlers(app, state)
    app.include_router(router)
    app.add_middleware(RecordStatus)  # the status of what FastAPI's routes answer, for counting
    # In front of FastAPI: count every request, answer infer calls, pass the rest to FastAPI;
    # outermost, and only with an allowlist, CORS: preflights are answered before anything counts.
    app.infer_calls = InferCalls(state)
    app.front = with_cors(
        CountRequests(InferFastPath(app.through_fastapi, app.infer_calls), state.metrics),
        settings.cors_origin_list,
    )
    install_openapi(app, lambda: state.manager.current.signature if state.manager.current else None)
    return app


class ServeApp(FastAPI):
    """FastAPI with opsloop's own ASGI layers (`front`) in front of its middleware stack.

    Starlette wraps every middleware added to an app in its error middleware and a `send`
    wrapper; the infer fast path handles its own errors, so it runs outside them and an infer
    call costs no more framework layers than it needs. `front` ends in `through_fastapi`.
    `infer_calls` is what the connection protocol of `opsloop serve` (`wire`) answers infer
    calls with, without ASGI.
    """

    front: ASGIApp | None = None
    infer_calls: InferCalls | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None:
            await self.through_fastapi(scope, receive, send)
        else:
            await self.front(scope, receive, send)

    async def through_fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI itself: its middleware stack and routes."""
        await super().__call__(scope, receive, send)


def add_exception_handlers(app: FastAPI, state: AppState) -> None:
    """Every error becomes `{"error": "..."}` with its status; only real bugs are 500s."""

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        route = request.scope.get("route")
        state.metrics.reject(getattr(route, "path", UNMATCHED), exc.reason)
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return JSONBytes({"error": str(exc)}, exc.status, headers=headers)

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONBytes({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONBytes({"error": f"invalid {where}: {first.get('msg', 'bad request')}"}, 422)

    async def client_gone(_request: Request, _exc: Exception) -> Response:
        return Response(status_code=CLIENT_GONE)

    async def unexpected(_request: Request, exc: Exception) -> Response:
        logger.error("request failed", exc_info=exc)
        return JSONBytes({"error": "internal error; see the server log"}, 500)

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)


def app_from_env() -> FastAPI:
    """The app factory uvicorn imports (`opsloop serve`): settings from `OPSLOOP_*`."""
    return create_app(get_settings())
