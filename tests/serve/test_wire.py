"""The infer exchange on the connection (`serve.wire`), in process.

uvicorn's own httptools protocol, as `opsloop serve` configures it, is fed request bytes by hand
and writes into a recording transport, so what a real socket cannot stage is staged here: a
model that fails mid-batch, a connection whose answer cannot be written while others in the same
batch can, and the answers of one batch reaching the journal in one write.
`tests/integration/test_wire.py` drives the same code over real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.server import ServerState

from opsloop.serve.app import create_app
from opsloop.serve.limits import ConnectionLimits, http_options
from opsloop.serve.wire import AnswersInfer, find_infer_calls
from tests.serve.inprocess import INFER, infer_body, make_settings, metric

pytestmark = pytest.mark.anyio

LIMITS = ConnectionLimits(max_header_bytes=32 * 1024, header_timeout_s=10, body_timeout_s=10)


class RecordingTransport(asyncio.Transport):
    """Keeps what the protocol writes; a real socket's other duties are no-ops."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Client:
    """One connection: send a request's bytes, read back the answers written so far."""

    def __init__(self, protocol: Any, transport: RecordingTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send_infer(self, pixels: npt.NDArray[np.float32], request_id: str) -> None:
        body = orjson.dumps(infer_body(pixels, id=request_id))
        self.protocol.data_received(
            b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (INFER.encode(), len(body), body)
        )

    def answers(self) -> list[tuple[int, Any]]:
        """(status, JSON body) of each response written, in order."""
        found = []
        for response in self.transport.written:
            head, _, body = response.partition(b"\r\n\r\n")
            found.append((int(head.split(b" ", 2)[1]), orjson.loads(body)))
        return found


@pytest.fixture
async def served(tmp_path: Path, tiny_bundle: Path) -> AsyncIterator[FastAPI]:
    app = create_app(make_settings(tmp_path, tiny_bundle))
    async with app.router.lifespan_context(app):
        yield app


def connect(app: FastAPI) -> Client:
    config = uvicorn.Config(app, lifespan="off", **http_options(LIMITS))
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config,
        server_state=ServerState(),
        app_state={},
        _loop=asyncio.get_running_loop(),
    )
    assert isinstance(protocol, AnswersInfer)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return Client(protocol, transport)


async def settle() -> None:
    """Let the batcher run and the answers of its batch go out (a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_failing_model_is_a_json_500_and_the_connection_serves_on(
    served: FastAPI, pixels: npt.NDArray[np.float32], monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = served.state.serve.manager.current.batcher
    client = connect(served)

    def broken(_rows: Any) -> Any:
        raise RuntimeError("the model broke")

    monkeypatch.setattr(batcher, "run_batch", broken)
    client.send_infer(pixels[:1], "first")
    await settle()
    monkeypatch.undo()
    client.send_infer(pixels[:1], "second")
    await settle()
    (failed, failed_body), (ok, ok_body) = client.answers()
    assert (failed, failed_body) == (500, {"error": "internal error; see the server log"})
    assert (ok, ok_body["id"]) == (200, "second")
    text = served.state.serve.metrics.render()[0].decode()
    endpoint = 'endpoint="/v2/models/{model_name}/infer"'
    assert metric(text, f'opsloop_requests_total{{{endpoint},status="500"}}') == 1


async def test_an_answer_that_cannot_be_sent_leaves_the_rest_of_its_batch_answered(
    served: FastAPI, pixels: npt.NDArray[np.float32], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = [connect(served) for _ in range(3)]

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug in writing")

    monkeypatch.setattr(clients[1].protocol, "write_answer", broken)
    for index, client in enumerate(clients):
        client.send_infer(pixels[:1], f"c{index}")
    await settle()
    assert [answer[1]["id"] for answer in clients[0].answers()] == ["c0"]
    assert clients[1].answers() == []
    assert [answer[1]["id"] for answer in clients[2].answers()] == ["c2"]
    text = served.state.serve.metrics.render()[0].decode()
    endpoint = 'endpoint="/v2/models/{model_name}/infer"'
    assert metric(text, f'opsloop_requests_total{{{endpoint},status="200"}}') == 2
    assert metric(text, f'opsloop_requests_total{{{endpoint},status="500"}}') == 1


async def test_the_answers_of_one_batch_reach_the_journal_in_one_write(
    served: FastAPI, pixels: npt.NDArray[np.float32]
) -> None:
    predlog = served.state.serve.predlog
    writes: list[list[str]] = []
    append_batches = predlog.append_batches

    def recording(batches: Any) -> None:
        writes.append([request_id for batch in batches for request_id in batch.request_ids])
        append_batches(batches)

    predlog.append_batches = recording
    clients = [connect(served) for _ in range(6)]
    for index, client in enumerate(clients):
        client.send_infer(pixels[:1], f"j{index}")  # all queued before the batcher runs
    await settle()
    assert all(client.answers()[0][0] == 200 for client in clients)
    assert writes == [[f"j{index}" for index in range(6)]]


async def test_the_infer_calls_are_found_under_uvicorn_wrappers(app: FastAPI) -> None:
    class Wrapper:  # as uvicorn's proxy-headers middleware keeps the app it wraps
        def __init__(self, app: Any) -> None:
            self.app = app

    assert find_infer_calls(Wrapper(Wrapper(app))) is getattr(app, "infer_calls", None)
    assert find_infer_calls(app) is not None
    assert find_infer_calls(FastAPI()) is None  # any other app: everything goes through ASGI


async def test_a_client_gone_with_a_request_pipelined_behind_its_infer_is_counted_499(
    served: FastAPI, pixels: npt.NDArray[np.float32]
) -> None:
    client = connect(served)
    client.send_infer(pixels[:1], "gone")
    client.protocol.data_received(b"GET /v2/health/ready HTTP/1.1\r\nHost: test\r\n\r\n")
    client.protocol.connection_lost(None)  # before the batch runs
    await settle()
    assert client.answers() == []
    text = served.state.serve.metrics.render()[0].decode()
    endpoint = 'endpoint="/v2/models/{model_name}/infer"'
    assert metric(text, f'opsloop_requests_total{{{endpoint},status="499"}}') == 1


async def test_an_infer_call_makes_no_task_where_any_other_request_does(
    served: FastAPI, pixels: npt.NDArray[np.float32]
) -> None:
    """The module's claim: no ASGI cycle (and so no task) per infer call."""
    infer, ready = connect(served), connect(served)
    infer.send_infer(pixels[:1], "no-task")
    assert infer.protocol.tasks == set()
    ready.protocol.data_received(b"GET /v2/health/ready HTTP/1.1\r\nHost: test\r\n\r\n")
    assert len(ready.protocol.tasks) == 1  # uvicorn's ASGI cycle for everything else
    await settle()
    assert infer.answers()[0][0] == 200
