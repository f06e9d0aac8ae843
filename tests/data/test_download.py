"""download_file against a real HTTP server on 127.0.0.1 that plays scripted replies."""

from __future__ import annotations

import gzip
import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from opsloop.data.download import download_file
from opsloop.errors import DownloadError

FAST = {"retries": 3, "backoff_seconds": 0.01, "timeout_seconds": 5.0}


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    # A Content-Length to claim instead of the true one (to simulate a cut connection).
    declared_length: int | None = None


class Mirror:
    """Threaded HTTP server: per path a queue of replies (the last one repeats); 404 otherwise."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def next_reply(self, path: str) -> Reply:
        with self._lock:
            self.requests.append(path)
            queue = self.routes.get(path)
            if not queue:
                return Reply(status=404, body=b"not found")
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reply = mirror.next_reply(self.path)
                self.send_response(reply.status)
                length = reply.declared_length
                self.send_header(
                    "Content-Length", str(len(reply.body) if length is None else length)
                )
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        return Handler


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    server = Mirror()
    thread = threading.Thread(
        target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def payload() -> bytes:
    """A small gzip IDX file: 20 random 28x28 images."""
    images = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 3]) + np.array([20, 28, 28], dtype=">u4").tobytes()
    return gzip.compress(header + images.tobytes(), mtime=0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_then_serves_from_cache(
    mirror: Mirror, payload: bytes, tmp_path: Path
) -> None:
    mirror.routes["/mnist/f.gz"] = [Reply(body=payload)]
    dest = tmp_path / "cache" / "f.gz"

    assert download_file([mirror.url("/mnist/f.gz")], dest, sha(payload), **FAST) == dest
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["f.gz"]  # no temp file left

    assert download_file([mirror.url("/mnist/f.gz")], dest, sha(payload).upper(), **FAST) == dest
    assert mirror.requests == ["/mnist/f.gz"]  # the second call never touched the network


def test_cached_file_with_wrong_content_is_replaced(
    mirror: Mirror, payload: bytes, tmp_path: Path
) -> None:
    mirror.routes["/f.gz"] = [Reply(body=payload)]
    dest = tmp_path / "f.gz"
    dest.write_bytes(b"stale partial download")

    download_file([mirror.url("/f.gz")], dest, sha(payload), **FAST)

    assert dest.read_bytes() == payload
    assert mirror.requests == ["/f.gz"]


def test_checksum_mismatch_fails_and_leaves_nothing(
    mirror: Mirror, payload: bytes, tmp_path: Path
) -> None:
    mirror.routes["/f.gz"] = [Reply(body=payload)]
    wrong = "0" * 64
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match=rf"sha256 {sha(payload)} but {wrong} was expected"):
        download_file([mirror.url("/f.gz")], cache / "f.gz", wrong, **FAST)

    assert list(cache.iterdir()) == []
    assert mirror.requests == ["/f.gz"]  # a bad checksum is not retried


def test_checksum_error_is_one_line_naming_url_and_fix(
    mirror: Mirror, payload: bytes, tmp_path: Path
) -> None:
    mirror.routes["/f.gz"] = [Reply(body=payload)]

    with pytest.raises(DownloadError) as info:
        download_file([mirror.url("/f.gz")], tmp_path / "f.gz", "ab" * 32, **FAST)

    message = str(info.value)
    assert "\n" not in message
    assert mirror.url("/f.gz") in message
    assert "check data.mirrors" in message


def test_server_errors_are_retried_until_success(
    mirror: Mirror, payload: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mirror.routes["/f.gz"] = [Reply(500), Reply(500), Reply(body=payload)]
    dest = tmp_path / "f.gz"

    with caplog.at_level(logging.WARNING, logger="opsloop.data.download"):
        download_file([mirror.url("/f.gz")], dest, sha(payload), **FAST)

    assert dest.read_bytes() == payload
    assert mirror.requests == ["/f.gz"] * 3
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("status", [500, 503, 429])
def test_persistent_server_error_gives_up_after_retries(
    mirror: Mirror, tmp_path: Path, status: int
) -> None:
    mirror.routes["/f.gz"] = [Reply(status)]

    with pytest.raises(DownloadError, match=rf"HTTP {status} .*after 4 attempts.*data\.mirrors"):
        download_file(
            [mirror.url("/f.gz")],
            tmp_path / "f.gz",
            "0" * 64,
            retries=4,
            backoff_seconds=0.01,
            timeout_seconds=5.0,
        )

    assert mirror.requests == ["/f.gz"] * 4
    assert list(tmp_path.iterdir()) == []


def test_not_found_falls_over_to_next_mirror_without_retrying(
    mirror: Mirror, payload: bytes, tmp_path: Path
) -> None:
    mirror.routes["/second/f.gz"] = [Reply(body=payload)]
    dest = tmp_path / "f.gz"

    download_file(
        [mirror.url("/first/f.gz"), mirror.url("/second/f.gz")], dest, sha(payload), **FAST
    )

    assert dest.read_bytes() == payload
    assert mirror.requests == ["/first/f.gz", "/second/f.gz"]


def test_all_mirrors_missing_names_every_url(mirror: Mirror, tmp_path: Path) -> None:
    urls = [mirror.url("/a/f.gz"), mirror.url("/b/f.gz")]

    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(urls, tmp_path / "f.gz", "0" * 64, **FAST)

    assert all(url in str(info.value) for url in urls)
    assert mirror.requests == ["/a/f.gz", "/b/f.gz"]


def test_truncated_body_is_retried(mirror: Mirror, payload: bytes, tmp_path: Path) -> None:
    cut = Reply(body=payload[:100], declared_length=len(payload))
    mirror.routes["/f.gz"] = [cut, Reply(body=payload)]
    dest = tmp_path / "f.gz"

    download_file([mirror.url("/f.gz")], dest, sha(payload), **FAST)

    assert dest.read_bytes() == payload
    assert mirror.requests == ["/f.gz"] * 2


def test_always_truncated_body_fails_and_leaves_nothing(
    mirror: Mirror, payload: bytes, tmp_path: Path
) -> None:
    mirror.routes["/f.gz"] = [Reply(body=payload[:100], declared_length=len(payload))]

    with pytest.raises(DownloadError, match=rf"truncated body: got 100 of {len(payload)} bytes"):
        download_file([mirror.url("/f.gz")], tmp_path / "f.gz", sha(payload), **FAST)

    assert mirror.requests == ["/f.gz"] * 3
    assert list(tmp_path.iterdir()) == []


def test_refused_connection_is_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:  # reserve a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/f.gz"

    with pytest.raises(DownloadError, match=rf"could not download f\.gz from {url}"):
        download_file([url], tmp_path / "f.gz", "0" * 64, **FAST)

    assert list(tmp_path.iterdir()) == []


def test_no_mirrors_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"set data\.mirrors"):
        download_file([], tmp_path / "f.gz", "0" * 64, **FAST)
