"""The coalescing transport: a head and its body in one write, nothing lost on close, on a real
socket pair (what the peer receives) and against a recording transport (how many writes)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from opsloop.serve.transport import CoalescingTransport


class Recording(asyncio.Transport):
    """Records each write handed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def test_a_head_and_its_body_leave_in_one_write_at_once() -> None:
    async def scenario() -> list[list[bytes]]:
        inner = Recording()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        seen = []
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"")
        seen.append(list(inner.writes))  # the head waits for its body
        transport.write(b'{"a": 1}')
        seen.append(list(inner.writes))  # and leaves with it, in the same iteration
        transport.write(b"lone")
        seen.append(list(inner.writes))
        await asyncio.sleep(0)
        seen.append(list(inner.writes))  # a write nothing followed leaves at the iteration's end
        return seen

    head_and_body = b'HTTP/1.1 200 OK\r\n\r\n{"a": 1}'
    assert asyncio.run(scenario()) == [
        [],
        [head_and_body],
        [head_and_body],
        [head_and_body, b"lone"],
    ]


def test_close_sends_what_is_pending_and_abort_drops_it() -> None:
    async def scenario() -> tuple[Recording, Recording]:
        loop = asyncio.get_running_loop()
        closed, aborted = Recording(), Recording()
        wrapped_closed = CoalescingTransport(closed, loop)
        wrapped_closed.write(b"last")
        wrapped_closed.close()
        wrapped_aborted = CoalescingTransport(aborted, loop)
        wrapped_aborted.write(b"lost")
        wrapped_aborted.abort()
        await asyncio.sleep(0)  # the scheduled flushes run and find nothing to send
        return closed, aborted

    closed, aborted = asyncio.run(scenario())
    assert closed.closed
    assert closed.writes == [b"last"]
    assert aborted.aborted
    assert aborted.writes == []


def test_a_real_peer_receives_every_byte_in_order() -> None:
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        wrapped = CoalescingTransport(transport, loop)  # type: ignore[arg-type]
        for part in (b"head\r\n\r\n", b"body", b"more"):
            wrapped.write(part)
        wrapped.close()
        theirs.setblocking(False)
        received = b""
        while not received.endswith(b"more"):
            received += await loop.sock_recv(theirs, 1024)
        theirs.close()
        return received

    assert asyncio.run(scenario()) == b"head\r\n\r\nbodymore"
