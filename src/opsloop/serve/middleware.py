"""Request counting: every request's endpoint, status and latency, for `/metrics`.

`CountRequests` wraps the whole app. Whatever answers a request writes its status into the ASGI
scope under `STATUS_KEY` (the fast path itself, FastAPI's routes through `RecordStatus`), so the
counter wraps no `send` and the hot infer path allocates nothing for it.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opsloop.serve.metrics import ServeMetrics

# Scope keys, set by the app that answers the request and read by `CountRequests` when it is done.
ENDPOINT_KEY = "opsloop.endpoint"  # the metrics label, for a request no FastAPI route answers
STATUS_KEY = "opsloop.status"  # the status answered; absent when an exception escaped (a 500)
TIMED_OUT_KEY = "opsloop.timed_out"  # set by `limits` when it closed a request's slow body
UNMATCHED = "unmatched"  # the label of a request no route matched
CLIENT_GONE = 499  # nginx's convention for "the client closed the connection", for metrics only
BODY_TIMEOUT = 408  # counted instead of CLIENT_GONE when the server closed a too-slow body


class CountRequests:
    """Counts and times every HTTP request by endpoint and status.

    The endpoint is `scope[ENDPOINT_KEY]` when the app that answered set one, else the matched
    FastAPI route's template (e.g. `/v2/models/{model_name}`), else `unmatched`. The status is
    `scope[STATUS_KEY]`, or 500 when nothing recorded one because an exception escaped; a
    client that "left" because the server closed its too-slow body (`limits`) counts as 408.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            endpoint = scope.get(ENDPOINT_KEY)
            if endpoint is None:
                endpoint = getattr(scope.get("route"), "path", None) or UNMATCHED
            status = scope.get(STATUS_KEY, 500)
            if status == CLIENT_GONE and TIMED_OUT_KEY in scope:
                status = BODY_TIMEOUT
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)


class RecordStatus:
    """Writes the status of each response that passes through it into `scope[STATUS_KEY]`.

    It sits around FastAPI's routing, which cannot report its status any other way; the fast
    path, in front of it, records its own status without the extra `send` wrapper.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                scope[STATUS_KEY] = message["status"]
            await send(message)

        await self.app(scope, receive, send_recording)
