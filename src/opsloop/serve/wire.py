"""Infer calls answered on the HTTP connection itself: uvicorn's protocol, minus the ASGI cycle.

For every request uvicorn builds an ASGI scope, a request-response cycle with its event, a task
and a coroutine, then four message dicts pass through `receive` and `send`, and each response
header is checked by regular expressions. For a 64-pixel image that framework work cost more
than the model does (taking it away saved more CPU per request than the model uses: the A/B in
docs/serving.md, "Against the goals"). So the connection protocol of `opsloop
serve` (`AnswersInfer`, mixed into `limits`' protocol) recognises an infer POST once its
headers are parsed, collects its body, runs `fastpath.InferCalls` on it and writes the answer
straight to the socket when its micro-batch is done: the batcher hands the outputs to the
request's `Exchange` directly, with no scope, task, coroutine or future per request.

Everything else goes through ASGI as before, and so do infer calls that need what only the ASGI
stack does: a request pipelined behind one still in flight (answers must keep their order), a
browser's request (it carries an `Origin` and may need CORS headers), `Expect: 100-continue`, a
percent-encoded path. Those reach the same `InferCalls` through `fastpath.InferFastPath`, so both
ways answer alike. The header and body limits (`limits`) apply to both: they run first.
"""

from __future__ import annotations

import http
import time
from typing import TYPE_CHECKING, Any

from opsloop.serve.fastpath import (
    INFER_ENDPOINT,
    INFER_SUFFIX,
    MODELS_PREFIX,
    Answer,
    InferCall,
    InferCalls,
    InferHeaders,
    InferTarget,
    Outputs,
    infer_headers,
)
from opsloop.serve.middleware import BODY_TIMEOUT, CLIENT_GONE, TIMED_OUT_KEY
from opsloop.serve.transport import CoalescingTransport

if TYPE_CHECKING:  # a mixin of uvicorn's httptools protocol, which needs httptools to import
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as ProtocolBase
else:
    ProtocolBase = object

INFER_PREFIX = MODELS_PREFIX.encode()
INFER_END = INFER_SUFFIX.encode()


class _NoEvent:
    """uvicorn sets its cycle's event when the connection is lost; an exchange waits on none."""

    def set(self) -> None:
        pass


class Exchange:
    """One infer request on a connection, from its parsed headers to its answer.

    It takes the place where uvicorn keeps the connection's current request cycle (`cycle`),
    so uvicorn queues a request pipelined behind it, marks it `disconnected` when the client
    goes and clears `keep_alive` on shutdown; and it is the `batching.Waiter` the model's
    micro-batcher hands the outputs to.
    """

    __slots__ = (
        "call",
        "chunks",
        "disconnected",
        "keep_alive",
        "protocol",
        "response_complete",
        "response_started",
        "scope",
        "size",
        "started",
        "target",
        "url",
        "version",
    )
    message_event = _NoEvent()

    def __init__(self, protocol: AnswersInfer, url: bytes, version: str) -> None:
        self.protocol = protocol
        self.url = url
        self.version = version
        self.keep_alive = version != "1.0" and protocol.parser.should_keep_alive()
        self.started = time.perf_counter()
        self.target: InferTarget | None = None
        self.call: InferCall | None = None  # set once its rows wait on the batcher
        self.chunks: list[bytes] = []
        self.size = 0
        self.response_started = False
        self.response_complete = False
        self.disconnected = False
        self.scope: dict[str, Any] = {}  # `limits` marks a body timeout here

    def submit(self, calls: InferCalls, body: bytes) -> None:
        """Decode the body and queue its rows on the model (or answer the error now)."""
        assert self.target is not None
        try:
            call = calls.decode(self.target, body, self.started)
            call.served.batcher.submit_to(call.request.pixels, self)
        except Exception as exc:
            self.finish(calls.failed(exc))
            return
        self.call = call

    # --- batching.Waiter: the micro-batcher delivers here, inside its loop iteration ---------

    def done(self) -> bool:
        return self.response_complete

    def set_result(self, outputs: Outputs, /) -> None:
        calls = self.protocol.infer_calls
        assert calls is not None
        assert self.call is not None
        calls.answer_soon(self.call, outputs, self.respond)  # with the rest of its batch

    def set_exception(self, exception: BaseException, /) -> None:
        calls = self.protocol.infer_calls
        assert calls is not None
        self.finish(calls.failed(exception))

    # --- the answer ------------------------------------------------------------------------

    def finish(self, answer: Answer) -> None:
        """Send `answer` and count it."""
        self.count(self.respond(answer))

    def respond(self, answer: Answer) -> int:
        """Send `answer` (unless the client is gone) and free the connection; the status to
        count for it."""
        self.response_started = self.response_complete = True
        if self.disconnected:
            return self.gone_status()
        protocol = self.protocol
        protocol.write_answer(answer, self.keep_alive)
        protocol.answered(self, answer.status)
        return answer.status

    def gone_status(self) -> int:
        """How a request whose client left is counted: 408 when `limits` closed it as too slow."""
        return BODY_TIMEOUT if TIMED_OUT_KEY in self.scope else CLIENT_GONE

    def count(self, status: int) -> None:
        calls = self.protocol.infer_calls
        assert calls is not None
        calls.metrics.observe_request(INFER_ENDPOINT, status, time.perf_counter() - self.started)


class AnswersInfer(ProtocolBase):
    """The part of `opsloop serve`'s connection protocol that answers infer calls (see above).

    A mixin in front of uvicorn's `HttpToolsProtocol` (and behind `limits`' checks): each
    parser callback either handles an infer exchange or passes on to uvicorn.
    """

    infer_calls: InferCalls | None
    exchange: Exchange | None  # the request being parsed, when it is an infer exchange

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.infer_calls = find_infer_calls(self.app)
        self.exchange = None
        self.in_flight: Exchange | None = None  # the newest infer exchange (answered or not)
        # An answer is complete when written: it need not wait to join a later write.
        self.send_now = (
            transport.write_now if isinstance(transport, CoalescingTransport) else transport.write
        )
        self.date_headers: list[tuple[bytes, bytes]] | None = None
        self.date_block = b""
        self.idle_since: float | None = None  # loop time of the last answer; None while busy

    # --- keep-alive: one idle timer per connection, not one per answer -------------------
    # uvicorn arms a timer after every answer and cancels it on the next read: a timer handle
    # made and dropped per request (~2 us). Here a read only marks the connection busy; the
    # timer, armed when an answer leaves an idle connection without one, closes it only if it
    # has been idle for the whole keep-alive time, and otherwise waits out the rest.

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None  # a read: busy until its answer (the header timeout applies)

    def on_response_complete(self) -> None:
        """uvicorn's (start a request pipelined behind, or wait for the next), keeping the
        connection's idle timer instead of making a new one."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None or self.transport.is_closing():
            return  # busy: the answer that ends it arms the timer again
        left = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(
                left, self.timeout_keep_alive_handler
            )
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)
        exchange = self.in_flight
        if exchange is None or exchange.response_complete:
            return
        # uvicorn marks only the newest request (`cycle`), which may be one pipelined behind it.
        exchange.disconnected = True
        if exchange.call is None:  # gone before its body was complete: nothing else counts it
            exchange.response_complete = True
            exchange.count(exchange.gone_status())

    def on_message_begin(self) -> None:
        # The ASGI scope is built only for a request that goes through ASGI: not here.
        self.url = b""
        self.headers = []
        self.expect_100_continue = False
        self.exchange = None

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            # Answered and closed (a 413) in the middle of a read: what the parser still finds
            # in it, a request pipelined behind, must not run. Without a new cycle, uvicorn
            # drops its body too (the closed exchange is complete).
            return
        headers = self.infer_exchange_headers()
        if headers is not None:
            self.begin_exchange(headers)
            return
        url, raw_headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # uvicorn's scope for this request (it resets these three)
        self.url, self.headers, self.expect_100_continue = url, raw_headers, expect
        self.scope["headers"] = raw_headers
        super().on_headers_complete()

    def infer_exchange_headers(self) -> InferHeaders | None:
        """The headers, when this request is an infer call answered here; None for ASGI's."""
        cycle = self.cycle
        if (
            self.infer_calls is None
            or (cycle is not None and not cycle.response_complete)  # pipelined behind another
            or self.expect_100_continue
            or self.root_path
            or self.parser.get_method() != b"POST"
            or self.parser.should_upgrade()
        ):
            return None
        path = self.url.partition(b"?")[0]
        if not (path.startswith(INFER_PREFIX) and path.endswith(INFER_END)) or b"%" in path:
            return None
        headers = infer_headers(self.headers)
        return None if headers.origin is not None else headers

    def begin_exchange(self, headers: InferHeaders) -> None:
        assert self.infer_calls is not None
        exchange = self.exchange = Exchange(self, self.url, self.parser.get_http_version())
        self.cycle = exchange  # type: ignore[assignment]
        self.in_flight = exchange
        try:
            path = self.url.partition(b"?")[0].decode("ascii")
            exchange.target = self.infer_calls.target(path, headers)
        except Exception as exc:  # answered now; the body that follows is read and dropped
            exchange.finish(self.infer_calls.failed(exc))

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            super().on_body(body)
            return
        if exchange.response_complete:
            return
        exchange.size += len(body)
        assert self.infer_calls is not None
        if exchange.size > self.infer_calls.settings.max_payload_bytes:
            exchange.keep_alive = False  # the rest of the body is not read: close after the 413
            exchange.finish(self.infer_calls.payload_too_large())
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            super().on_message_complete()
            return
        if exchange.response_complete:
            return
        chunks = exchange.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        assert self.infer_calls is not None
        exchange.submit(self.infer_calls, body)

    def write_answer(self, answer: Answer, keep_alive: bool) -> None:
        """The whole response, head and body, in one write."""
        parts = [status_line(answer.status), self.current_date_block()]
        for name, value in answer.headers:
            parts += (name, b": ", value, b"\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", answer.body)
        self.send_now(b"".join(parts))

    def current_date_block(self) -> bytes:
        """uvicorn's default headers (the `date`, renewed every second), encoded once each."""
        headers = self.server_state.default_headers
        if headers is not self.date_headers:
            self.date_headers = headers
            self.date_block = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return self.date_block

    def answered(self, exchange: Exchange, status: int) -> None:
        """After an exchange's answer: close or keep the connection, as uvicorn would."""
        if self.access_log:
            self.access_logger.info(
                '%s - "POST %s HTTP/%s" %d',
                f"{self.client[0]}:{self.client[1]}" if self.client else "-",
                exchange.url.decode("ascii", "replace"),
                exchange.version,
                status,
            )
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()  # starts a request pipelined behind it, or the idle timer


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        phrase = http.HTTPStatus(status).phrase
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")
    return line


def find_infer_calls(app: object) -> InferCalls | None:
    """The app's `InferCalls`, under the wrappers uvicorn may put around it (each keeps the app
    it wraps as `.app`); None for an app without one, which then gets everything over ASGI."""
    for _ in range(8):
        calls = getattr(app, "infer_calls", None)
        if isinstance(calls, InferCalls):
            return calls
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
