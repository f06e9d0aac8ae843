"""`opsloop ui`: start Streamlit on the app, bound to 127.0.0.1 by default.

The process becomes Streamlit (`os.execve`), so a signal sent to `opsloop ui` (Ctrl-C, `kill`
from `make ui` or a test) reaches the server that holds the port, and nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from opsloop.errors import MissingExtraError
from opsloop.service import check_port
from opsloop.ui.app import APP_PATH
from opsloop.ui.settings import ENV_PREFIX, UISettings


def streamlit_command(settings: UISettings) -> list[str]:
    """The `streamlit run` command line for `settings`: headless, no usage statistics sent, no
    file watching (an installed app does not change under itself)."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.address",
        settings.host,
        "--server.port",
        str(settings.port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--logger.level",
        settings.log_level,
    ]


def streamlit_env(settings: UISettings) -> dict[str, str]:
    """This environment plus the settings the command line chose, so the app reads the same."""
    chosen = {
        "HOST": settings.host,
        "PORT": str(settings.port),
        "SERVER_URL": settings.server_url,
        "LOG_LEVEL": settings.log_level,
    }
    return dict(os.environ) | {f"{ENV_PREFIX}{key}": value for key, value in chosen.items()}


def run_ui(settings: UISettings) -> None:
    """Replace this process with Streamlit serving the app; fails first, in one line, when the
    `ui` extra is missing or the port is taken."""
    if importlib.util.find_spec("streamlit") is None:
        raise MissingExtraError("opsloop ui", "ui", "streamlit")
    check_port(settings.host, settings.port, f"{ENV_PREFIX}PORT")
    command = streamlit_command(settings)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, streamlit_env(settings))
