"""Infer calls answered on the connection itself (`serve.wire`), against a real `opsloop serve`.

`opsloop serve` answers `POST /v2/models/{name}/infer` straight from its HTTP protocol, without
an ASGI cycle, and sends everything else (and infer calls that need the ASGI stack: pipelined
behind another request, carrying an `Origin`, `Expect: 100-continue`, a percent-encoded path)
through ASGI. What only a real socket shows: pipelined requests are answered in order whichever
way each goes; keep-alive, `Connection: close` and HTTP/1.0 are honoured; an early error leaves
the connection usable; an oversized body is refused and the connection closed; the answer's head
is well formed and the same as the ASGI path's; and `/metrics` counts exactly what was answered.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.integration.processes import serving_bundle
from tests.serve.onnx_bundles import write_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_PAYLOAD_BYTES = 4096  # OPSLOOP_MAX_PAYLOAD_BYTES of the server here
MODEL_VERSION = "1"
INFER_PATH = "/v2/models/digits/infer"
INFER_ENDPOINT = "/v2/models/{model_name}/infer"
PIXELS = [float(index % 17) for index in range(64)]
READ_TIMEOUT_S = 10.0


def infer_body(request_id: str | None = None) -> bytes:
    """A valid one-image infer body; `request_id` becomes its (echoed) `id`."""
    document: dict[str, Any] = {
        "inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": PIXELS}]
    }
    if request_id is not None:
        document["id"] = request_id
    return json.dumps(document).encode()


@dataclass(frozen=True)
class Response:
    """One HTTP response as read off the socket."""

    status_line: bytes
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order sent
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"header {name!r} sent {len(values)} times: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """A client socket that reads responses one at a time, so pipelined answers can be split."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"the server closed the connection; unparsed: {bytes(self.buffer)!r}")
        self.buffer += chunk

    def take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def take_line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self.fill()
        return self.take(end + 2)[:-2]

    def read_response(self) -> Response:
        """Exactly one response: its head, then `content-length` bytes (or chunks)."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self.fill()
        head = self.take(end + 4)[:-4]
        status_line, *lines = head.split(b"\r\n")
        version, status, _ = status_line.split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), status_line
        headers = []
        for line in lines:
            name, colon, value = line.partition(b":")
            assert colon, f"a header line without a colon: {line!r}"
            assert name, f"a header line without a name: {line!r}"
            assert name == name.strip(), f"whitespace around a header name: {line!r}"
            headers.append((name.decode("ascii").lower(), value.strip().decode("latin-1")))
        response = Response(status_line, int(status), headers, b"")
        if 100 <= response.status < 200:
            return response
        if (response.header("transfer-encoding") or "").lower() == "chunked":
            chunks = []
            while size := int(self.take_line().split(b";")[0], 16):
                chunks.append(self.take(size))
                assert self.take(2) == b"\r\n"
            while self.take_line():  # trailers, then the blank line
                pass
            body = b"".join(chunks)
        else:
            length = response.header("content-length")
            assert length is not None, f"a response without a length: {response.headers}"
            body = self.take(int(length))
        return Response(status_line, response.status, headers, body)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within `timeout`, sending nothing more."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(READ_TIMEOUT_S)
        assert not data, f"unexpected bytes after the last response: {data!r}"
        return True


class Served:
    """The server under test: its address, request builders and a metrics reader."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT_S) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield Connection(sock)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        *,
        version: str = "1.1",
        length: int | None = None,
    ) -> bytes:
        """A request's bytes; `Content-Length` is the body's unless `length` or a header says."""
        lines = [f"{method} {path} HTTP/{version}", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in headers]
        names = {name.lower() for name, _ in headers}
        if body and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body) if length is None else length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def infer(
        self,
        request_id: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        *,
        path: str = INFER_PATH,
        version: str = "1.1",
    ) -> bytes:
        extra = [("Content-Type", "application/json"), *headers]
        return self.request("POST", path, infer_body(request_id), extra, version=version)

    def ready(self) -> bytes:
        return self.request("GET", "/v2/health/ready")

    def metrics(self) -> Metrics:
        response = httpx.get(f"{self.url}/metrics", timeout=READ_TIMEOUT_S)
        assert response.status_code == 200
        return Metrics(response.text)

    def infer_ok(self) -> None:
        response = httpx.post(f"{self.url}{INFER_PATH}", content=infer_body(), timeout=10)
        assert response.status_code == 200, response.text


class Metrics:
    """A `/metrics` scrape and the samples these tests read from it."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                self.samples[key] = float(value)

    def requests(self, status: int, endpoint: str = INFER_ENDPOINT) -> float:
        key = f'opsloop_requests_total{{endpoint="{endpoint}",status="{status}"}}'
        return self.samples.get(key, 0.0)

    def predictions(self) -> float:
        return sum(v for k, v in self.samples.items() if k.startswith("opsloop_predictions_total{"))


def wait_for(served: Served, reached: Callable[[Metrics], bool], timeout: float = 5.0) -> Metrics:
    """The first scrape for which `reached` holds (or the last one, after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = served.metrics()
        if reached(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One worker, its payload limit at 4 KiB (an infer body here is about 500 bytes)."""
    tmp_path = tmp_path_factory.mktemp("serve-wire")
    bundle = write_bundle(tmp_path / "bundle", version=MODEL_VERSION, seed=0)
    limits = {"OPSLOOP_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD_BYTES)}
    with serving_bundle(bundle, tmp_path, "none", **limits) as url:
        yield Served(int(url.rsplit(":", 1)[1]))


@pytest.fixture(autouse=True)
def still_serving(served: Served) -> Iterator[None]:
    """Each test starts and ends with a server that answers."""
    served.infer_ok()
    yield
    served.infer_ok()


def assert_only_counted(served: Served, before: Metrics, status: int) -> None:
    """One request counted with `status` since `before`, and nothing run behind it: no other
    answer or departure counted, no prediction made."""
    wait_for(served, lambda m: m.requests(status) > before.requests(status))
    time.sleep(0.3)  # anything run behind the close would be counted by now
    after = served.metrics()
    assert after.requests(status) - before.requests(status) == 1
    assert after.requests(200) == before.requests(200)
    assert after.requests(499) == before.requests(499)
    assert after.predictions() == before.predictions()


def assert_answered(response: Response, request_id: str) -> None:
    assert response.status == 200, response.body
    document = response.json()
    assert document["id"] == request_id
    assert document["model_name"] == "digits"
    assert [output["name"] for output in document["outputs"]]


@pytest.mark.parametrize("count", [2, 8])
def test_pipelined_infer_calls_are_answered_in_order_and_kept_alive(
    served: Served, count: int
) -> None:
    ids = [f"pipelined-{index}" for index in range(count)]
    with served.connect() as connection:
        connection.send(b"".join(served.infer(request_id) for request_id in ids))
        responses = [connection.read_response() for _ in ids]
        assert [response.status for response in responses] == [200] * count
        assert [response.json()["id"] for response in responses] == ids
        assert all(response.header("connection") is None for response in responses)
        connection.send(served.infer("after-the-pipeline"))
        assert_answered(connection.read_response(), "after-the-pipeline")
        assert not connection.buffer


@pytest.mark.parametrize(
    "order",
    [
        ("infer", "ready"),
        ("ready", "infer"),
        ("infer", "ready", "infer"),
        ("ready", "infer", "ready"),
    ],
    ids="-".join,
)
def test_infer_pipelined_with_a_health_check_is_answered_in_order(
    served: Served, order: tuple[str, ...]
) -> None:
    requests = [
        served.infer(f"mixed-{index}") if kind == "infer" else served.ready()
        for index, kind in enumerate(order)
    ]
    with served.connect() as connection:
        connection.send(b"".join(requests))
        responses = [connection.read_response() for _ in order]
        for index, (kind, response) in enumerate(zip(order, responses, strict=True)):
            assert response.status == 200, (kind, response.body)
            if kind == "infer":
                assert_answered(response, f"mixed-{index}")
            else:
                assert b"outputs" not in response.body
                assert response.header("x-model-version") is None
        connection.send(served.ready() + served.infer("last"))
        assert connection.read_response().status == 200
        assert_answered(connection.read_response(), "last")
        assert not connection.buffer


def test_connection_close_is_answered_then_closed(served: Served) -> None:
    with served.connect() as connection:
        connection.send(served.infer("closing", [("Connection", "close")]))
        response = connection.read_response()
        assert_answered(response, "closing")
        assert response.header("connection") == "close"
        assert connection.closed_by_server()


def test_a_request_pipelined_behind_connection_close_is_not_answered(served: Served) -> None:
    with served.connect() as connection:
        connection.send(
            served.infer("closing", [("Connection", "close")]) + served.infer("too-late")
        )
        response = connection.read_response()
        assert_answered(response, "closing")
        assert response.header("connection") == "close"
        assert connection.closed_by_server()


@pytest.mark.parametrize("path", [INFER_PATH, "/v2/models/digits/versions/1/infer"])
def test_http_1_0_without_keep_alive_is_answered_then_closed(served: Served, path: str) -> None:
    with served.connect() as connection:
        connection.send(served.infer("old-client", path=path, version="1.0"))
        response = connection.read_response()
        assert_answered(response, "old-client")
        assert response.header("connection") == "close"
        assert connection.closed_by_server()


EARLY_ERRORS = {
    "unknown-model": ("/v2/models/nope/infer", "application/json", infer_body("bad"), 404),
    "unknown-version": (
        "/v2/models/digits/versions/9/infer",
        "application/json",
        infer_body("bad"),
        404,
    ),
    "not-json": (INFER_PATH, "text/plain", infer_body("bad"), 415),
    "bad-body": (INFER_PATH, "application/json", b'{"inputs": "nope"}', 400),
}


@pytest.mark.parametrize("case", sorted(EARLY_ERRORS))
@pytest.mark.parametrize("send", ["in-one-send", "after-reading-the-error"])
def test_an_error_with_a_body_leaves_the_connection_usable(
    served: Served, case: str, send: str
) -> None:
    path, content_type, body, status = EARLY_ERRORS[case]
    bad = served.request("POST", path, body, [("Content-Type", content_type)])
    with served.connect() as connection:
        if send == "in-one-send":  # the valid call pipelined right behind the bad one
            connection.send(bad + served.infer("good"))
            error = connection.read_response()
        elif status == 400:  # answered only once its body is read
            connection.send(bad)
            error = connection.read_response()
            connection.send(served.infer("good"))
        else:  # answered from its headers: the body comes after the answer
            head, _, rest = bad.partition(b"\r\n\r\n")
            connection.send(head + b"\r\n\r\n")
            error = connection.read_response()
            connection.send(rest + served.infer("good"))
        assert error.status == status, error.body
        assert set(error.json()) == {"error"}
        assert error.header("content-type") == "application/json"
        assert error.header("connection") is None
        assert_answered(connection.read_response(), "good")
        assert not connection.buffer


def chunked_over_the_limit(served: Served) -> bytes:
    """An infer request whose chunked body (no `Content-Length`) is twice the payload limit."""
    data = b'{"inputs": [], "padding": "' + b"x" * (2 * MAX_PAYLOAD_BYTES) + b'"}'
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(part), part)
        for part in (data[start : start + 1000] for start in range(0, len(data), 1000))
    )
    return served.request(
        "POST",
        INFER_PATH,
        chunks + b"0\r\n\r\n",
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
    )


def test_a_chunked_body_over_the_payload_limit_is_413_and_closed(served: Served) -> None:
    """The body's size is known only as it arrives: refused there, the rest not read."""
    before = served.metrics()
    with served.connect() as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.send(chunked_over_the_limit(served))  # the client does not wait
        response = connection.read_response()
        assert response.status == 413
        assert "OPSLOOP_MAX_PAYLOAD_BYTES" in response.json()["error"]
        assert response.header("connection") == "close"
        assert connection.closed_by_server()
    after = wait_for(served, lambda m: m.requests(413) > before.requests(413))
    assert after.requests(413) - before.requests(413) == 1
    assert after.requests(200) == before.requests(200)


def test_nothing_pipelined_behind_a_413_that_closes_is_run(served: Served) -> None:
    """A valid call sent right behind the oversized chunked body, in the same send: the server
    closed the connection after its 413, so it must neither answer nor run that call (no
    prediction journaled or counted, no request counted)."""
    before = served.metrics()
    with served.connect() as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.send(chunked_over_the_limit(served) + served.infer("behind-the-413"))
        response = connection.read_response()
        assert response.status == 413
        assert response.header("connection") == "close"
        assert connection.closed_by_server()
    assert_only_counted(served, before, 413)


def test_a_declared_length_over_the_payload_limit_is_413_at_once(served: Served) -> None:
    """Refused from its `Content-Length` before any body is read, without waiting for it."""
    body = b'{"padding": "' + b"x" * (2 * MAX_PAYLOAD_BYTES) + b'"}'
    request = served.request("POST", INFER_PATH, body, [("Content-Type", "application/json")])
    with served.connect() as connection:
        head, _, rest = request.partition(b"\r\n\r\n")
        connection.send(head + b"\r\n\r\n")  # the answer comes before the body is sent
        response = connection.read_response()
        assert response.status == 413
        assert "OPSLOOP_MAX_PAYLOAD_BYTES" in response.json()["error"]
        connection.send(rest + served.infer("after-the-413"))  # the body comes anyway: dropped
        assert_answered(connection.read_response(), "after-the-413")


@pytest.mark.parametrize("way", ["on-the-connection", "over-asgi"])
def test_a_declared_length_over_the_limit_sent_whole_is_413_and_its_body_dropped(
    served: Served, way: str
) -> None:
    """Headers, the whole oversized body and a valid call in one send, the client not waiting:
    a 413 refused from the headers (kept alive, as uvicorn does for an early answer), the body
    read and dropped, and the call behind it answered; alike on both ways in."""
    body = b'{"padding": "' + b"x" * (2 * MAX_PAYLOAD_BYTES) + b'"}'
    headers = [("Content-Type", "application/json")]
    if way == "over-asgi":
        headers.append(("Origin", served.url))
    request = served.request("POST", INFER_PATH, body, headers)
    before = served.metrics()
    with served.connect() as connection:
        connection.send(request + served.infer("behind-the-413"))
        response = connection.read_response()
        assert response.status == 413
        assert "OPSLOOP_MAX_PAYLOAD_BYTES" in response.json()["error"]
        assert response.header("connection") is None
        assert_answered(connection.read_response(), "behind-the-413")
        assert not connection.buffer
    after = wait_for(served, lambda m: m.requests(413) > before.requests(413))
    assert after.requests(413) - before.requests(413) == 1


def test_cross_origin_calls_are_refused_and_same_origin_ones_answered(served: Served) -> None:
    with served.connect() as connection:
        connection.send(served.infer("elsewhere", [("Origin", "http://elsewhere.example")]))
        refused = connection.read_response()
        assert refused.status == 403
        assert "OPSLOOP_CORS_ORIGINS" in refused.json()["error"]
        assert refused.header("access-control-allow-origin") is None
        connection.send(served.infer("no-origin"))
        assert_answered(connection.read_response(), "no-origin")
        connection.send(served.infer("own-origin", [("Origin", served.url)]))
        assert_answered(connection.read_response(), "own-origin")
        # The same three pipelined in one send: in order, whichever way each goes.
        connection.send(
            served.infer("a", [("Origin", "http://elsewhere.example")])
            + served.infer("b")
            + served.infer("c", [("Origin", served.url)])
        )
        statuses = [connection.read_response() for _ in range(3)]
        assert [response.status for response in statuses] == [403, 200, 200]
        assert [response.json().get("id") for response in statuses[1:]] == ["b", "c"]
        assert not connection.buffer


def test_expect_100_continue_gets_a_continue_before_the_body(served: Served) -> None:
    request = served.infer("continued", [("Expect", "100-continue")])
    head, _, body = request.partition(b"\r\n\r\n")
    with served.connect() as connection:
        connection.send(head + b"\r\n\r\n")
        interim = connection.read_response()
        assert interim.status_line == b"HTTP/1.1 100 Continue"
        connection.send(body)
        assert_answered(connection.read_response(), "continued")
        connection.send(served.infer("next"))  # and the connection goes on
        assert_answered(connection.read_response(), "next")


def test_a_percent_encoded_path_is_answered(served: Served) -> None:
    with served.connect() as connection:
        connection.send(served.infer("encoded", path="/v2/models/dig%69ts/infer"))
        assert_answered(connection.read_response(), "encoded")


def test_the_metrics_count_exactly_what_was_answered(served: Served) -> None:
    before = served.metrics()
    sequential, pipelined = 5, 4
    with served.connect() as connection:
        for index in range(sequential):
            connection.send(served.infer(f"counted-{index}"))
            assert_answered(connection.read_response(), f"counted-{index}")
        connection.send(b"".join(served.infer(f"piped-{index}") for index in range(pipelined)))
        for index in range(pipelined):
            assert_answered(connection.read_response(), f"piped-{index}")
        connection.send(served.infer("missing", path="/v2/models/nope/infer"))
        assert connection.read_response().status == 404
    answered = sequential + pipelined
    after = wait_for(
        served,
        lambda m: (
            m.requests(200) - before.requests(200) >= answered
            and m.requests(404) > before.requests(404)
        ),
    )
    assert after.requests(200) - before.requests(200) == answered
    assert after.requests(404) - before.requests(404) == 1
    assert after.predictions() - before.predictions() == answered


def test_a_client_gone_before_the_answer_is_counted_and_others_served(served: Served) -> None:
    before = served.metrics()
    with served.connect() as connection:
        connection.send(served.infer("gone"))
    after = wait_for(
        served,
        lambda m: m.requests(200) + m.requests(499) > before.requests(200) + before.requests(499),
    )
    # Answered (200) when the model beat the close, else 499: a race between loop callbacks.
    answered = after.requests(200) - before.requests(200)
    gone = after.requests(499) - before.requests(499)
    assert answered + gone == 1, (answered, gone)
    assert after.predictions() - before.predictions() == 1  # journaled before the send
    with served.connect() as connection:
        connection.send(served.infer("still-here"))
        assert_answered(connection.read_response(), "still-here")


def test_a_client_gone_in_the_middle_of_its_body_is_counted_499(served: Served) -> None:
    request = served.infer("half")
    before = served.metrics()
    with served.connect() as connection:
        connection.send(request[: len(request) - 100])
        time.sleep(0.1)  # the server reads the headers and part of the body
    after = wait_for(served, lambda m: m.requests(499) > before.requests(499))
    assert after.requests(499) - before.requests(499) == 1
    assert after.requests(200) == before.requests(200)
    assert after.predictions() == before.predictions()


def test_an_answers_head_is_well_formed(served: Served) -> None:
    with served.connect() as connection:
        connection.send(served.infer("headed"))
        response = connection.read_response()
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert_answered(response, "headed")
    date = response.header("date")
    assert date is not None
    sent = email.utils.parsedate_to_datetime(date)
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 60
    assert response.header("content-type") == "application/json"
    assert response.header("content-length") == str(len(response.body))
    assert response.header("x-model-version") == MODEL_VERSION
    assert response.header("transfer-encoding") is None
    assert response.header("server") is None


def test_both_ways_in_answer_alike(served: Served) -> None:
    """The same call on the connection and over ASGI (an own-origin call goes that way)."""
    with served.connect() as connection:
        connection.send(served.infer("alike"))
        direct = connection.read_response()
        connection.send(served.infer("alike", [("Origin", served.url)]))
        through_asgi = connection.read_response()
        connection.send(served.request("POST", "/v2/models/nope/infer", infer_body()))
        direct_error = connection.read_response()
        connection.send(
            served.request("POST", "/v2/models/nope/infer", infer_body(), [("Origin", served.url)])
        )
        asgi_error = connection.read_response()
    for one, other in ((direct, through_asgi), (direct_error, asgi_error)):
        assert one.status_line == other.status_line
        assert one.body == other.body
        assert sorted(name for name, _ in one.headers) == sorted(name for name, _ in other.headers)
        assert [(n, v) for n, v in one.headers if n != "date"] == [
            (n, v) for n, v in other.headers if n != "date"
        ]


def test_nothing_pipelined_behind_an_early_error_with_close_is_run(served: Served) -> None:
    """A request refused from its headers with `Connection: close`, a valid call right behind
    it in the same send: the server answers the first, closes, and runs nothing more."""
    bad = served.request(
        "POST",
        "/v2/models/nope/infer",
        infer_body("bad"),
        [("Content-Type", "application/json"), ("Connection", "close")],
    )
    before = served.metrics()
    with served.connect() as connection:
        connection.send(bad + served.infer("behind-the-close"))
        response = connection.read_response()
        assert response.status == 404
        assert response.header("connection") == "close"
        assert connection.closed_by_server()
    assert_only_counted(served, before, 404)


# --- keep-alive: one idle timer per connection (wire.AnswersInfer) ----------------------------

KEEP_ALIVE_S = 0.5


@pytest.fixture(scope="module")
def short_keep_alive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server whose idle connections are closed after KEEP_ALIVE_S (OPSLOOP_KEEP_ALIVE_S)."""
    tmp_path = tmp_path_factory.mktemp("serve-keep-alive")
    bundle = write_bundle(tmp_path / "bundle", version=MODEL_VERSION, seed=0)
    with serving_bundle(bundle, tmp_path, "none", OPSLOOP_KEEP_ALIVE_S=str(KEEP_ALIVE_S)) as url:
        yield Served(int(url.rsplit(":", 1)[1]))


@pytest.mark.parametrize("last", ["infer", "ready"], ids=["after-infer", "after-asgi"])
def test_an_idle_connection_is_closed_after_the_keep_alive_time(
    short_keep_alive: Served, last: str
) -> None:
    with short_keep_alive.connect() as connection:
        connection.send(short_keep_alive.infer("first"))
        assert_answered(connection.read_response(), "first")
        time.sleep(KEEP_ALIVE_S * 0.6)  # the idle timer now runs; the next answer resets it
        request = short_keep_alive.infer("last") if last == "infer" else short_keep_alive.ready()
        connection.send(request)
        assert connection.read_response().status == 200
        answered = time.monotonic()
        assert connection.closed_by_server(timeout=KEEP_ALIVE_S + 5)
        idle = time.monotonic() - answered
    # Measured from the last answer, not from the first (whose timer was still pending).
    assert KEEP_ALIVE_S * 0.9 <= idle < KEEP_ALIVE_S + 3, idle


def test_a_connection_in_use_outlives_the_keep_alive_time(short_keep_alive: Served) -> None:
    with short_keep_alive.connect() as connection:
        started = time.monotonic()
        count = 0
        while time.monotonic() - started < KEEP_ALIVE_S * 4:
            connection.send(short_keep_alive.infer(f"busy-{count}"))
            assert_answered(connection.read_response(), f"busy-{count}")
            count += 1
            time.sleep(KEEP_ALIVE_S / 5)
        assert count >= 10
        assert not connection.closed_by_server(timeout=KEEP_ALIVE_S / 5)


def test_a_request_in_progress_is_not_cut_by_the_keep_alive_time(short_keep_alive: Served) -> None:
    request = short_keep_alive.infer("slow-body")
    head, _, body = request.partition(b"\r\n\r\n")
    with short_keep_alive.connect() as connection:
        connection.send(short_keep_alive.infer("warm"))
        assert_answered(connection.read_response(), "warm")
        connection.send(head + b"\r\n\r\n" + body[:10])  # busy: the body timeout (30 s) applies
        time.sleep(KEEP_ALIVE_S * 3)
        connection.send(body[10:])
        assert_answered(connection.read_response(), "slow-body")
