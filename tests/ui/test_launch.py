"""`opsloop ui`: the Streamlit command it runs, its failures in one line, and no torch anywhere."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsloop.cli import main
from opsloop.errors import ConfigError
from opsloop.ui.app import APP_PATH
from opsloop.ui.launch import run_ui, streamlit_command, streamlit_env
from opsloop.ui.settings import load_ui_settings


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket listens on for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def test_the_command_serves_the_app_headless_on_loopback_and_sends_no_statistics(
    ui_env: Path,
) -> None:
    settings = load_ui_settings(port=8600, server_url="http://10.0.0.5:8000")
    command = streamlit_command(settings)
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(APP_PATH)]
    options = dict(zip(command[5::2], command[6::2], strict=True))
    assert options["--server.address"] == "127.0.0.1"
    assert options["--server.port"] == "8600"
    assert options["--server.headless"] == "true"
    assert options["--browser.gatherUsageStats"] == "false"
    env = streamlit_env(settings)
    assert env["OPSLOOP_UI_PORT"] == "8600"
    assert env["OPSLOOP_UI_SERVER_URL"] == "http://10.0.0.5:8000"
    assert env["OPSLOOP_UI_WORKSPACE"] == str(ui_env)  # the rest of the environment is kept
    assert APP_PATH.is_file()


def test_a_busy_port_fails_before_streamlit_starts(ui_env: Path, busy_port: int) -> None:
    with pytest.raises(
        ConfigError, match=f"cannot listen on 127.0.0.1:{busy_port}.*OPSLOOP_UI_PORT"
    ):
        run_ui(load_ui_settings(port=busy_port))


def test_the_cli_says_it_in_one_line_and_exits_2(
    ui_env: Path, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ui", "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{busy_port}")
    assert err.count("\n") == 1
    assert main(["ui", "--server", "localhost:8000"]) == 2
    assert "error: OPSLOOP_UI_SERVER_URL='localhost:8000' is invalid" in capsys.readouterr().err


def test_the_app_never_imports_torch_or_lightning(tmp_path: Path) -> None:
    """Every page rendered (registry read through MLflow included), then sys.modules inspected."""
    empty = tmp_path / "empty"
    empty.mkdir()
    script = f"""
import json, os, sys
from pathlib import Path
os.environ.update(OPSLOOP_UI_WORKSPACE={str(empty)!r}, OPSLOOP_UI_MONITOR_URL="none",
                  OPSLOOP_UI_SERVER_URL="http://127.0.0.1:9")
from streamlit.testing.v1 import AppTest
from tests.ui.stores import make_registry
os.environ["OPSLOOP_UI_TRACKING_URI"] = make_registry(Path({str(tmp_path)!r}))
for page in ("predict", "models", "monitoring", "loop"):
    script = f"from opsloop.ui import {{page}}\\n{{page}}.render()"
    app = AppTest.from_string(script, default_timeout=120).run()
    assert not app.exception, app.exception
import opsloop.ui.app, opsloop.ui.launch, opsloop.ui.sketch
heavy = ("torch", "lightning", "pytorch_lightning", "torchmetrics", "torchvision")
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in heavy)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
