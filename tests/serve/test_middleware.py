"""Request counting around bare ASGI apps: endpoint label, status, latency, and no send wrapper."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from opsloop.serve.metrics import ServeMetrics
from opsloop.serve.middleware import ENDPOINT_KEY, STATUS_KEY, CountRequests, RecordStatus

pytestmark = pytest.mark.anyio


async def receive() -> Message:
    return {"type": "http.request", "body": b""}


async def send(_message: Message) -> None:
    return None


def http_scope(path: str = "/x") -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": []}


def counted(metrics: ServeMetrics, endpoint: str, status: int) -> float | None:
    return metrics.registry.get_sample_value(
        "opsloop_requests_total", {"endpoint": endpoint, "status": str(status)}
    )


def latencies(metrics: ServeMetrics, endpoint: str) -> float | None:
    return metrics.registry.get_sample_value(
        "opsloop_request_latency_seconds_count", {"endpoint": endpoint}
    )


async def test_a_routed_response_is_counted_under_its_route_template() -> None:
    async def routed(scope: Scope, _receive: Receive, send: Send) -> None:
        scope["route"] = SimpleNamespace(path="/v2/models/{model_name}")
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    metrics = ServeMetrics()
    await CountRequests(RecordStatus(routed), metrics)(http_scope(), receive, send)
    assert counted(metrics, "/v2/models/{model_name}", 404) == 1
    assert latencies(metrics, "/v2/models/{model_name}") == 1


async def test_a_response_no_route_matched_is_unmatched() -> None:
    async def not_found(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})

    metrics = ServeMetrics()
    await CountRequests(RecordStatus(not_found), metrics)(http_scope(), receive, send)
    assert counted(metrics, "unmatched", 404) == 1


async def test_an_app_that_answers_itself_names_its_endpoint_and_status_in_the_scope() -> None:
    seen: list[Send] = []

    async def fast(scope: Scope, _receive: Receive, send_: Send) -> None:
        seen.append(send_)
        scope[ENDPOINT_KEY] = "/v2/models/{model_name}/infer"
        scope[STATUS_KEY] = 499  # the client left: nothing was sent

    metrics = ServeMetrics()
    await CountRequests(fast, metrics)(http_scope(), receive, send)
    assert counted(metrics, "/v2/models/{model_name}/infer", 499) == 1
    assert seen == [send]  # the counter wraps nothing on the way in


async def test_an_escaping_exception_counts_as_500_and_still_escapes() -> None:
    async def broken(_scope: Scope, _receive: Receive, _send: Send) -> None:
        raise RuntimeError("bug")

    metrics = ServeMetrics()
    with pytest.raises(RuntimeError, match="bug"):
        await CountRequests(RecordStatus(broken), metrics)(http_scope(), receive, send)
    assert counted(metrics, "unmatched", 500) == 1


async def test_lifespan_messages_pass_through_uncounted() -> None:
    calls: list[str] = []

    async def lifespan(scope: Scope, _receive: Receive, _send: Send) -> None:
        calls.append(scope["type"])

    metrics = ServeMetrics()
    await CountRequests(RecordStatus(lifespan), metrics)({"type": "lifespan"}, receive, send)
    assert calls == ["lifespan"]
    assert [family.samples for family in metrics.requests.collect()] == [[]]
