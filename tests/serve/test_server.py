"""The server's process plumbing (settings export, metrics directory, workers), without uvicorn."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from opsloop.errors import ConfigError
from opsloop.serve import server
from opsloop.serve.metrics import MULTIPROC_ENV
from opsloop.serve.settings import get_settings, load_settings
from opsloop.service import make_socket
from tests.serve.onnx_bundles import write_bundle


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`export_settings` writes OPSLOOP_* into os.environ: restore it after each test."""
    for key in list(os.environ):
        if key.startswith("OPSLOOP_") or key == MULTIPROC_ENV:
            monkeypatch.delenv(key)
    monkeypatch.setattr(os, "environ", os.environ.copy())
    get_settings.cache_clear()


def test_export_settings_lets_workers_read_the_same_settings(tmp_path: Path) -> None:
    settings = load_settings(
        bundle_path=tmp_path, port=9123, admin_token="t0ken", access_log=True, workers=2
    )
    server.export_settings(settings)
    assert os.environ["OPSLOOP_PORT"] == "9123"
    assert os.environ["OPSLOOP_ACCESS_LOG"] == "true"
    assert os.environ["OPSLOOP_ADMIN_TOKEN"] == "t0ken"
    assert "OPSLOOP_PREDLOG_URL" not in os.environ  # None: unset, so the default applies
    # The same settings, except that the workers leave ingesting to the ingester process.
    assert get_settings() == settings.model_copy(update={"ingest_in_process": False})


def test_metrics_dir_is_fresh_and_named_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.tempfile, "tempdir", str(tmp_path))
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"stale")
    prepared = server.prepare_metrics_dir(load_settings(metrics_dir=directory))
    assert prepared == directory
    assert list(directory.iterdir()) == []
    assert os.environ[MULTIPROC_ENV] == str(directory)
    temporary = server.prepare_metrics_dir(load_settings())
    assert temporary.is_dir()
    assert temporary.parent == tmp_path
    assert temporary.name.startswith(f"opsloop-metrics-{os.getpid()}-")
    assert os.environ[MULTIPROC_ENV] == str(temporary)


def test_metrics_dirs_of_dead_servers_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.tempfile, "tempdir", str(tmp_path))
    dead_pid = 2**22 + 12345  # above the kernel's pid_max default: no such process
    stale = tmp_path / f"opsloop-metrics-{dead_pid}-abc"
    live = tmp_path / f"opsloop-metrics-{os.getpid()}-def"
    unrelated = tmp_path / "opsloop-metrics-xyz"  # not named by a server of this version
    for directory in (stale, live, unrelated):
        directory.mkdir()
    server.remove_stale_metrics_dirs()
    assert not stale.exists()
    assert live.exists()
    assert unrelated.exists()


def test_workers_can_share_a_port() -> None:
    first = make_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = make_socket("127.0.0.1", port)
    try:
        assert second.getsockname()[1] == port
        assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        first.close()
        second.close()


def test_uvicorn_options_keep_the_access_log_off_and_log_our_package() -> None:
    options = server.uvicorn_options(load_settings(log_level="warning"))
    assert options["access_log"] is False
    assert options["lifespan"] == "on"
    assert options["log_config"]["loggers"]["opsloop"]["level"] == "WARNING"


def test_preflight_creates_the_log_table_before_workers_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    url = f"sqlite:///{tmp_path / 'log' / 'p.db'}"
    server.preflight(load_settings(bundle_path=bundle, predlog_url=url, port=free_port()))
    assert (tmp_path / "log" / "p.db").exists()


class Dead:
    """A process that has exited, as `multiprocessing` shows one."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode
        self.pid = None


def test_a_worker_dying_at_start_up_stops_the_server() -> None:
    worker = server.Child(Dead(3), server.time.monotonic())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="worker 0 exited with code 3 right after starting"):
        server.restart_if_dead(None, 0, worker)


def test_a_worker_that_dies_later_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    monkeypatch.setattr(server, "start_worker", lambda _context, index: started.append(index))
    server.restart_if_dead(None, 1, server.Child(Dead(-9), -1000.0))  # type: ignore[arg-type]
    assert started == [1]


def test_a_dead_ingester_is_always_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []

    def start_child(_context: object, _target: object, name: str) -> server.Child:
        started.append(name)
        return server.Child(Dead(0), 0.0)  # type: ignore[arg-type]

    monkeypatch.setattr(server, "start_child", start_child)
    monkeypatch.setattr(server.time, "sleep", lambda _s: None)
    just_now = server.Child(Dead(-9), server.time.monotonic())  # type: ignore[arg-type]
    server.restart_ingester_if_dead(None, just_now)  # even right after starting: no give-up
    assert started == ["opsloop-ingest"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
