"""Fixtures for the app's tests: an isolated environment, and pages run headless by AppTest."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from opsloop.ui.settings import get_settings
from tests.integration.processes import free_port

# Every variable the app reads, cleared so a developer's environment cannot leak into a test.
VARIABLES = (
    "OPSLOOP_TRACKING_URI",
    "OPSLOOP_PREDLOG_URL",
    "OPSLOOP_LOOP_DB_URL",
    "OPSLOOP_WORKSPACE",
)
PAGE_TIMEOUT_S = 120  # a first page run imports MLflow or scipy on a busy 2-core machine


@pytest.fixture
def ui_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty workspace for the app, no server or monitor behind it; yields the workspace.

    `get_settings()` is cached per process: cleared before and after, so each test's variables
    are the ones the pages read.
    """
    import os

    for name in [*VARIABLES, *(k for k in os.environ if k.startswith("OPSLOOP_UI_"))]:
        monkeypatch.delenv(name, raising=False)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setenv("OPSLOOP_UI_WORKSPACE", str(workspace))
    monkeypatch.setenv("OPSLOOP_UI_SERVER_URL", "http://127.0.0.1:9")  # discard: nothing answers
    monkeypatch.setenv("OPSLOOP_UI_MONITOR_URL", "none")
    get_settings.cache_clear()
    yield workspace
    get_settings.cache_clear()


@pytest.fixture
def run_page() -> Callable[[str], AppTest]:
    """Run one page module's `render()` headless and return the finished AppTest."""

    def run(name: str) -> AppTest:
        get_settings.cache_clear()  # the variables a test set after `ui_env`
        script = f"from opsloop.ui import {name}\n{name}.render()\n"
        return AppTest.from_string(script, default_timeout=PAGE_TIMEOUT_S).run()

    return run


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` under a real uvicorn server on a free 127.0.0.1 port, in a thread; yields its URL.

    Stopped (lifespan shutdown included: the prediction log is flushed) when the block ends.
    """
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"the app did not start on port {port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
