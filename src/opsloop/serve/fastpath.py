"""The hot path: `POST /v2/models/{name}[/versions/{v}]/infer`, whichever way it arrives.

`InferCalls` is the call itself, in three synchronous steps with no framework in them:
`target` (the path and headers, before any body is read: 404/503/415/403/413 early), `decode`
(the body, validated and routed to the champion or a canary) and `answer` (the response bytes,
with the prediction journaled and counted). Between `decode` and `answer` the rows wait on the
model's micro-batcher. orjson, no per-request pydantic: on a CPU the per-request framework
overhead, not the model, sets the throughput.

Two ways in, answering alike:

- `opsloop serve` answers infer calls on the connection itself, with no ASGI request cycle at
  all (`wire`);
- `InferFastPath`, a bare ASGI handler in front of FastAPI's routing, answers them everywhere
  else: in-process clients, uvicorn without httptools, a request pipelined behind another, and
  browsers' requests (which carry an `Origin` and may need CORS headers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from opsloop.predictions import CHAMPION_ROLE
from opsloop.serve.batching import BatcherClosedError
from opsloop.serve.cors import check_origin
from opsloop.serve.manager import ServedModel
from opsloop.serve.middleware import CLIENT_GONE, ENDPOINT_KEY, STATUS_KEY
from opsloop.serve.protocol import (
    HEADER_LENGTH,
    InferRequest,
    RequestError,
    check_content_type,
    decode_infer_request,
    encode_infer_response,
    error_body,
    output_tensors,
    parse_header_length,
)
from opsloop.serve.settings import ServeSettings
from opsloop.serve.state import AppState, Prediction

logger = logging.getLogger(__name__)

MODELS_PREFIX = "/v2/models/"
INFER_SUFFIX = "/infer"
VERSION_HEADER = "x-model-version"
ROLE_HEADER = "x-model-role"  # set on answers not given by the champion (a canary's)
# The metrics label of the infer call: the same route template form as every other endpoint's.
INFER_ENDPOINT = "/v2/models/{model_name}/infer"
# The request headers an infer call reads, by their (lower-case) wire names.
WANTED_HEADERS = {
    b"content-type": "content_type",
    b"content-length": "content_length",
    b"origin": "origin",
    b"host": "host",
    HEADER_LENGTH.encode(): "header_length",
}
JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/octet-stream"

# What the model's micro-batcher gives each request: (probabilities, embedding, logged
# embedding); see `runtime.OnnxModel.serve_batch`.
Outputs = tuple[npt.NDArray[Any], ...]
Headers = list[tuple[bytes, bytes]]
# Sends an answer; returns the status to count (499 when the client has gone meanwhile).
Reply = Callable[["Answer"], int]


@dataclass(slots=True)
class InferHeaders:
    """What an infer call reads from its request headers (None: not sent)."""

    content_type: str | None = None
    content_length: str | None = None
    origin: str | None = None
    host: str | None = None
    header_length: str | None = None


def infer_headers(raw: Iterable[tuple[bytes, bytes]]) -> InferHeaders:
    """The headers infer reads, from ASGI's (or uvicorn's) list of lower-case name/value pairs."""
    headers = InferHeaders()
    for name, value in raw:
        field = WANTED_HEADERS.get(name)
        if field is not None:
            setattr(headers, field, value.decode("latin-1"))
    return headers


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class InferTarget:
    """What the path and headers say: the model asked for and how its body is encoded."""

    name: str
    version: str | None
    header_length: int | None


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class InferCall:
    """A decoded request, on its way to the model that answers it."""

    request: InferRequest
    served: ServedModel
    role: str
    started: float


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class Answer:
    """A response: status, body and headers (without the server's own: date, connection)."""

    status: int
    body: bytes
    headers: Headers


class InferCalls:
    """The infer call in synchronous steps; see the module docstring for who drives them."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.metrics = state.metrics
        self.settings: ServeSettings = state.settings
        self.cors_origins = state.settings.cors_origin_list
        self._due: list[tuple[InferCall, Outputs, Reply]] = []  # see `answer_soon`

    def target(self, path: str, headers: InferHeaders) -> InferTarget:
        """Check what can be checked before the body: 404/503 for the model, 415, 403, 413."""
        name, version = parse_infer_path(path)
        self.state.served(name, version)  # 503/404 before reading a body for nothing
        check_content_type(headers.content_type)
        if headers.origin is not None:  # browsers only: refuse another site's page posting here
            check_origin(headers.origin, headers.host, self.cors_origins)
        check_declared_length(headers.content_length, self.settings.max_payload_bytes)
        return InferTarget(name, version, parse_header_length(headers.header_length))

    def decode(self, target: InferTarget, body: bytes, started: float) -> InferCall:
        """The validated request and who answers it; queue its rows before anything awaits,
        so the model cannot change in between."""
        served = self.state.served(target.name, target.version)
        request = decode_infer_request(
            body,
            served.signature,
            header_length=target.header_length,
            max_rows=self.settings.max_request_rows,
        )
        served, role = self.state.route(served, request.id)
        return InferCall(request, served, role, started)

    def answer(self, call: InferCall, outputs: Outputs) -> Answer:
        """The answer; a 200's prediction is journaled before this returns (before it is sent)."""
        (answer,) = self.answer_all([(call, outputs)])
        return answer

    def answer_all(self, answered: Sequence[tuple[InferCall, Outputs]]) -> list[Answer]:
        """The answers of calls whose outputs are in, their predictions journaled in one write."""
        answers: list[Answer] = []
        predictions: list[Prediction] = []
        for call, outputs in answered:
            try:
                answers.append(self.encode(call, outputs))
            except Exception as exc:
                answers.append(self.failed(exc))
                continue
            request = call.request
            logged = Prediction(
                request.id, "infer", call.served, request.pixels, outputs, call.started, call.role
            )
            predictions.append(logged)
        try:
            self.state.log_predictions(predictions)
        except Exception as exc:  # not journaled, so not answered as a success either
            failure = self.failed(exc)
            return [failure if answer.status == 200 else answer for answer in answers]
        return answers

    def answer_soon(self, call: InferCall, outputs: Outputs, reply: Reply) -> None:
        """Answer `call` through `reply` later in this loop iteration, together with every
        other call whose outputs arrive meanwhile (a micro-batch's arrive together): one journal
        write, one metrics update and one log projection for all of them."""
        if not self._due:
            asyncio.get_running_loop().call_soon(self._answer_due)
        self._due.append((call, outputs, reply))

    def _answer_due(self) -> None:
        due, self._due = self._due, []
        answers = self.answer_all([(call, outputs) for call, outputs, _ in due])
        statuses = []
        for (_, _, reply), answer in zip(due, answers, strict=True):
            try:
                statuses.append(reply(answer))
            except Exception:  # one connection's bug must not leave the others unanswered
                logger.exception("sending an infer answer failed")
                statuses.append(500)
        now = time.perf_counter()
        latencies: dict[int, list[float]] = {}
        for (call, _, _), status in zip(due, statuses, strict=True):
            latencies.setdefault(status, []).append(now - call.started)
        for status, seconds in latencies.items():
            self.metrics.observe_requests(INFER_ENDPOINT, status, seconds)

    def encode(self, call: InferCall, outputs: Outputs) -> Answer:
        signature = call.served.signature
        body, header_length = encode_infer_response(
            signature, call.request, output_tensors(outputs[0], outputs[1]), call.role
        )
        return Answer(200, body, answer_headers(body, signature.version, header_length, call.role))

    def failed(self, exc: BaseException) -> Answer:
        """The error answer for `exc`: its 4xx for bad input, a counted JSON 500 for a bug."""
        if isinstance(exc, RequestError):
            self.metrics.reject(INFER_ENDPOINT, exc.reason)
            return error_answer(exc.status, str(exc))
        if isinstance(exc, BatcherClosedError):  # cannot happen by construction; never a 500
            return error_answer(503, str(exc))
        logger.error("infer failed", exc_info=exc)
        return error_answer(500, "internal error; see the server log")

    def payload_too_large(self) -> Answer:
        return self.failed(payload_too_large(self.settings.max_payload_bytes))


def answer_headers(
    body: bytes, model_version: str | None, header_length: int | None, role: str = CHAMPION_ROLE
) -> Headers:
    headers = [
        (b"content-type", JSON_TYPE if header_length is None else BINARY_TYPE),
        (b"content-length", b"%d" % len(body)),
    ]
    if model_version is not None:
        headers.append((VERSION_HEADER.encode(), model_version.encode()))
    if header_length is not None:
        headers.append((HEADER_LENGTH.encode(), b"%d" % header_length))
    if role != CHAMPION_ROLE:
        headers.append((ROLE_HEADER.encode(), role.encode()))
    return headers


def error_answer(status: int, message: str) -> Answer:
    body = error_body(message)
    return Answer(status, body, answer_headers(body, None, None))


class InferFastPath:
    """Answers `POST /v2/models/{name}[/versions/{v}]/infer` over ASGI; passes the rest on.

    For `CountRequests` it records its label and status in the scope (`ENDPOINT_KEY`,
    `STATUS_KEY`; 499 when the client left before the answer). The infer call is answered in
    `__call__` itself, so a request costs no more coroutines than before counting moved out.
    """

    def __init__(self, app: ASGIApp, calls: InferCalls) -> None:
        self.app = app
        self.calls = calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_infer(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope[ENDPOINT_KEY] = INFER_ENDPOINT
        calls = self.calls
        try:
            headers = infer_headers(scope["headers"])
            target = calls.target(scope["path"], headers)
            body = await read_body(receive, headers.content_length, calls.settings)
            call = calls.decode(target, body, started)
            outputs = await call.served.batcher.predict(call.request.pixels)
            answer = calls.answer(call, outputs)
        except ClientDisconnect:
            scope[STATUS_KEY] = CLIENT_GONE
            return
        except Exception as exc:
            answer = calls.failed(exc)
        scope[STATUS_KEY] = answer.status
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
        )
        await send({"type": "http.response.body", "body": answer.body})


def is_infer(method: str, path: str) -> bool:
    return method == "POST" and path.startswith(MODELS_PREFIX) and path.endswith(INFER_SUFFIX)


def parse_infer_path(path: str) -> tuple[str, str | None]:
    """(model name, version or None) from `/v2/models/{name}[/versions/{v}]/infer`."""
    middle = path[len(MODELS_PREFIX) : -len(INFER_SUFFIX)]
    parts = middle.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    raise RequestError(
        f"no such endpoint {path}; use /v2/models/{{name}}/infer", status=404, reason="bad_path"
    )


async def read_body(receive: Receive, content_length: str | None, settings: ServeSettings) -> bytes:
    """The whole body, refusing (413) anything over the payload limit before reading it all."""
    limit = settings.max_payload_bytes
    check_declared_length(content_length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_declared_length(content_length: str | None, limit: int) -> None:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise payload_too_large(limit)


def payload_too_large(limit: int) -> RequestError:
    return RequestError(
        f"payload over the {limit}-byte limit (OPSLOOP_MAX_PAYLOAD_BYTES); send smaller batches",
        status=413,
        reason="payload_too_large",
    )
