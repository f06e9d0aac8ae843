"""Limits on slow and oversized clients, enforced where uvicorn reads the connection.

An ASGI app sees a request only once its headers are complete, so it can neither refuse a 64 MB
header nor close a client that trickles its headers or never sends any; and uvicorn reads
headers without bound and arms no timer before a connection's first request. `http_options`
gives uvicorn a subclass of its httptools protocol (the one `uvicorn[standard]` runs) with:

- a header size limit: over `max_header_bytes` -> 431, connection closed;
- a header timeout: headers not complete within `header_timeout_s` of the connection (or of the
  request's first byte, on a kept-alive one) -> 408, connection closed;
- a body timeout: a body not complete within `body_timeout_s` of its headers -> 408, connection
  closed; the app sees the client leave and the request is counted as a 408 in `/metrics`.

A timer is armed only while a request is incomplete after a read, so a request that arrives in
one piece costs none. The protocol also writes each answer in one send (`transport`) and
answers infer calls without an ASGI cycle (`wire`). uvicorn's internals are used here and in
`wire` only, so an upstream change is a two-file fix; `tests/integration/test_serve_limits.py`
and `tests/integration/test_wire.py` check them against the real thing.
"""

from __future__ import annotations

import asyncio
import http
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson

from opsloop.serve.middleware import TIMED_OUT_KEY
from opsloop.serve.transport import CoalescingTransport

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


def http_options(limits: ConnectionLimits) -> dict[str, Any]:
    """uvicorn options that enforce `limits` (only the header size without httptools)."""
    try:
        protocol = guarded_protocol(limits)
    except ImportError:  # uvicorn without [standard]: h11 bounds headers, nothing times out
        logger.warning("httptools is not installed: header and body timeouts are not enforced")
        return {"http": "h11", "h11_max_incomplete_event_size": limits.max_header_bytes}
    return {"http": protocol}


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with `limits` (a class: uvicorn makes one per connection)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from opsloop.serve.wire import AnswersInfer

    # The checks here run first; then `AnswersInfer` takes infer calls off the ASGI path.
    class GuardedHttpToolsProtocol(AnswersInfer, HttpToolsProtocol):
        settings: ClassVar[ConnectionLimits] = limits

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.reading_headers = False  # between a request's first byte and its last header
            self.reading_body = False  # between its last header and its last body byte
            self.header_bytes = 0  # read so far for the headers being read
            self.chunk_bytes = 0  # the size of the read being parsed
            self.oversized = False  # the headers just parsed are over the limit
            self.header_timer: asyncio.TimerHandle | None = None
            self.body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # A response's head and body in one send (see `transport`).
            super().connection_made(CoalescingTransport(transport, self.loop))
            # uvicorn arms no timer until a first response: a silent client would stay forever.
            self.header_timer = self.loop.call_later(
                self.settings.header_timeout_s, self.header_timed_out
            )

        def connection_lost(self, exc: Exception | None) -> None:
            self.cancel_timers()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self.chunk_bytes = len(data)
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.oversized:
                self.refuse(431, self.too_large())
            elif self.reading_headers:
                # Counted by read, so a read that also ends the previous request counts in full:
                # at most one read (256 KiB) too many, and only for pipelined requests.
                self.header_bytes += len(data)
                if self.header_bytes > self.settings.max_header_bytes:
                    self.refuse(431, self.too_large())
                elif self.header_timer is None:
                    self.header_timer = self.loop.call_later(
                        self.settings.header_timeout_s, self.header_timed_out
                    )
            elif self.reading_body and self.body_timer is None:
                self.body_timer = self.loop.call_later(
                    self.settings.body_timeout_s, self.body_timed_out
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.reading_headers = True
            self.header_bytes = 0

        def on_headers_complete(self) -> None:
            self.reading_headers = False
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            limit = self.settings.max_header_bytes
            # Headers that came complete in one read: measured only when they may be too large.
            if self.header_bytes + self.chunk_bytes > limit and self.parsed_header_bytes() > limit:
                self.oversized = True  # no ASGI task for it; refused once this read is parsed
                return
            self.reading_body = True
            super().on_headers_complete()

        def parsed_header_bytes(self) -> int:
            return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

        def on_body(self, body: bytes) -> None:
            if not self.oversized:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self.oversized:
                return
            self.reading_body = False
            if self.body_timer is not None:
                self.body_timer.cancel()
                self.body_timer = None
            super().on_message_complete()

        def too_large(self) -> str:
            return (
                f"request headers over the {self.settings.max_header_bytes}-byte limit "
                "(OPSLOOP_MAX_HEADER_BYTES); send smaller headers"
            )

        def header_timed_out(self) -> None:
            self.header_timer = None
            self.refuse(
                408,
                f"request headers not received within {self.settings.header_timeout_s:g} s "
                "(OPSLOOP_HEADER_TIMEOUT_S)",
            )

        def body_timed_out(self) -> None:
            self.body_timer = None
            if not self.reading_body:
                return
            if self.cycle is not None:
                cast(dict[str, Any], self.cycle.scope)[TIMED_OUT_KEY] = True
            self.refuse(
                408,
                f"request body not received within {self.settings.body_timeout_s:g} s of its "
                "headers (OPSLOOP_BODY_TIMEOUT_S)",
            )

        def refuse(self, status: int, message: str) -> None:
            """Answer `status` unless the connection's last request is being answered, then close.

            While headers are read, `self.cycle` is the previous request's (or None); while a
            body is read, it is this request's, which the app may have answered already.
            """
            if self.transport.is_closing():
                return
            self.cancel_timers()
            cycle = self.cycle
            if cycle is None or (
                not cycle.response_started if self.reading_body else cycle.response_complete
            ):
                self.transport.write(error_response(status, message))
            if cycle is not None and not cycle.response_complete:
                # The app's receive() now reports the client gone and its send() is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

        def cancel_timers(self) -> None:
            for timer in (self.header_timer, self.body_timer):
                if timer is not None:
                    timer.cancel()
            self.header_timer = self.body_timer = None

    return GuardedHttpToolsProtocol


def error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response `{"error": message}` that closes the connection."""
    body = orjson.dumps({"error": message})
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
