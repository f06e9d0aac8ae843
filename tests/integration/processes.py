"""Real server processes for integration tests: a free loopback port, readiness, stop by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

START_TIMEOUT_S = 180  # imports take a while on a busy 2-core machine
OPSLOOP = [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """One child process with its output in a log file; `stop()` signals it by PID only."""

    def __init__(self, command: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.command = list(command)
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_until(
        self, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S
    ) -> None:
        """Poll `ready` until it is true; fail with the process's log if it exits or times out."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{what}: process exited early:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if ready():
                    return
            time.sleep(0.25)
        raise AssertionError(f"{what}: not reached after {timeout:.0f}s:\n{self.log()}")

    def wait_for_http(self, url: str, timeout: float = START_TIMEOUT_S) -> None:
        self.wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, url, timeout)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers; only this process, by its PID."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running(command: Sequence[str], log_path: Path, env: dict[str, str]) -> Iterator[Process]:
    """A started process that is always stopped, by PID, when the block ends."""
    process = Process(command, log_path, {**os.environ, **env})
    try:
        yield process.start()
    finally:
        process.stop()


@contextlib.contextmanager
def serving_bundle(
    bundle: Path, tmp_path: Path, predlog_url: str, **settings: str
) -> Iterator[str]:
    """`opsloop serve` of `bundle` with one worker on a free loopback port; yields its URL.

    `settings` are more `OPSLOOP_*` variables, e.g. `OPSLOOP_ADMIN_TOKEN="t"`.
    """
    port = free_port()
    env = {
        "OPSLOOP_BUNDLE_PATH": str(bundle),
        "OPSLOOP_HOST": "127.0.0.1",
        "OPSLOOP_PORT": str(port),
        "OPSLOOP_WORKERS": "1",
        "OPSLOOP_WORKSPACE": str(tmp_path),
        "OPSLOOP_PREDLOG_URL": predlog_url,
        "OPSLOOP_PREDLOG_FLUSH_MS": "50",
        **settings,
    }
    url = f"http://127.0.0.1:{port}"
    with running([*OPSLOOP, "serve"], tmp_path / f"serve-{port}.log", env) as server:
        server.wait_for_http(f"{url}/v2/health/ready")
        yield url


def metric_value(text: str, sample: str) -> float:
    """The value of one exposition sample, e.g. `opsloop_drift_detected` or `x{a="b"}`."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == sample:
            return float(value)
    raise AssertionError(f"no sample {sample} in the exposition:\n{text}")
