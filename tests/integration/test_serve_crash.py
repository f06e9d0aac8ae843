"""`opsloop serve` killed outright mid-traffic: no acknowledged prediction is lost or doubled,
and no worker outlives its supervisor.

Clients send single-row requests with their own ids and remember every id answered 200 (the
acknowledged ones). Some process of the server — a worker, the ingester, the supervisor, or all
of them at once — gets SIGKILL while the traffic runs; the server is started again on the same
workspace and port (so it finds the journal), and the log must then hold every acknowledged id
exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from opsloop.predictions import read_predictions
from tests.integration.test_serve_server import Server, descendants, infer_body, samples
from tests.serve.onnx_bundles import write_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 4
TRAFFIC_BEFORE_KILL_S = 1.5


class Traffic:
    """Client threads sending until stopped; the ids the server acknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acknowledged: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._send, args=(index,), daemon=True)
            for index in range(CLIENTS)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _send(self, index: int) -> None:
        pixels = samples(1, seed=index)
        with httpx.Client(base_url=self.url, timeout=10) as client:
            sent = 0
            while not self._stop.is_set():
                request_id = f"c{index}-{sent}"
                sent += 1
                try:
                    response = client.post(
                        "/v2/models/digits/infer", json=infer_body(pixels, request_id)
                    )
                except httpx.HTTPError:
                    self.errors += 1
                    time.sleep(0.01)
                    continue
                if response.status_code == 200:
                    with self._lock:
                        self.acknowledged.append(request_id)


def pids_in_log(server: Server) -> tuple[list[int], int]:
    """(worker pids, ingester pid) as the supervisor logged them at start."""
    match = re.search(
        r"workers \(pids ([\d, ]+)\) and the log ingester \(pid (\d+)\)", server.log()
    )
    assert match is not None, server.log()
    return [int(pid) for pid in match.group(1).split(", ")], int(match.group(2))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is dead for our purposes
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def logged_counts(url: str) -> collections.Counter[str]:
    return collections.Counter(read_predictions(url).request_ids)


def victims_of(server: Server, which: str) -> list[int]:
    assert server.process is not None
    workers, ingester = pids_in_log(server)
    return {
        "worker": workers[:1],
        "ingester": [ingester],
        "supervisor": [server.process.pid],
        "all": [server.process.pid, *workers, ingester],
    }[which]


@pytest.mark.parametrize("which", ["worker", "ingester", "supervisor", "all"])
def test_sigkill_loses_no_acknowledged_prediction(tmp_path: Path, which: str) -> None:
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    server = Server(tmp_path, bundle)
    try:
        server.start()
        with Traffic(server.url) as traffic:
            time.sleep(TRAFFIC_BEFORE_KILL_S)
            for pid in victims_of(server, which):
                os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)  # traffic goes on: answered by the survivors, or refused
        before = len(traffic.acknowledged)
        assert before > 50, f"only {before} answers before the kill:\n{server.log()}"
    finally:
        server.stop()
    # Start again on the same workspace and port: the journal's leftovers are written first.
    restarted = Server(tmp_path, bundle, port=server.port)
    try:
        restarted.start()
        acknowledged = set(traffic.acknowledged)
        wait_until(
            lambda: acknowledged <= set(logged_counts(server.predlog_url)),
            60,
            "every acknowledged prediction in the log",
        )
    finally:
        restarted.stop()
    counts = logged_counts(server.predlog_url)
    assert acknowledged <= set(counts)
    doubled = {request_id: n for request_id, n in counts.items() if n > 1}
    assert doubled == {}, f"logged more than once: {list(doubled)[:5]}"
    assert not list((tmp_path / ".opsloop" / "journal").rglob("*.journal"))  # all ingested


def test_workers_and_ingester_die_with_their_supervisor(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    server = Server(tmp_path, bundle)
    try:
        server.start()
        assert server.process is not None
        workers, ingester = pids_in_log(server)
        children = [*workers, ingester]
        assert set(children) <= set(descendants(server.process.pid))
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in children), 30, "the children to exit")
        # Nobody answers on the port any more: a new server may take it, alone.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/v2/health/live", timeout=2)
    finally:
        server.stop()


def test_a_second_server_on_a_held_port_refuses_to_start(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    first = Server(tmp_path, bundle)
    try:
        first.start()
        second = Server(tmp_path / "second", bundle, port=first.port)
        (tmp_path / "second").mkdir()
        refused = subprocess.run(
            [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())",
             "serve"],
            env=second.env,
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2
        assert f"cannot listen on 127.0.0.1:{first.port}" in refused.stderr
        assert "stop the server that holds it" in refused.stderr
        with httpx.Client(base_url=first.url, timeout=10) as client:  # the first is unharmed
            body = infer_body(np.zeros((1, 1, 8, 8), np.float32), "after")
            assert client.post("/v2/models/digits/infer", json=body).status_code == 200
    finally:
        first.stop()
