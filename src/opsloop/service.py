"""What every opsloop HTTP service shares: settings errors, the listening socket, uvicorn logging.

The inference server (`opsloop serve`), the monitor (`opsloop monitor serve`) and the services
that join them read `OPSLOOP_*` settings with pydantic-settings and run under uvicorn on a port
they check first. The helpers here make those three things behave the same everywhere: a bad
setting is one line naming the variable and the fix, a busy port fails before anything starts,
and opsloop's own loggers print beside uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsloop.errors import ConfigError, redact_text

LOG_LEVELS = ("debug", "info", "warning", "error")
# Hints for the fields every service has; each service adds its own.
COMMON_HINTS = {
    "port": "use a TCP port between 1 and 65535",
    "log_level": f"use one of {', '.join(LOG_LEVELS)}",
}


@contextlib.asynccontextmanager
async def in_background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs (a service's periodic loop); cancel it after."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def settings_config(prefix: str) -> SettingsConfigDict:
    """Settings read from `<prefix><FIELD>` variables, unknown variables ignored, immutable."""
    return SettingsConfigDict(
        env_prefix=prefix, extra="ignore", protected_namespaces=(), frozen=True
    )


class ServiceSettings(BaseSettings):
    """What every service is told: where to listen and how much to log."""

    model_config = settings_config("OPSLOOP_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return check_log_level(value)


def settings_error(exc: ValidationError, prefix: str, hints: Mapping[str, str]) -> ConfigError:
    """The first problem of a settings validation as `PREFIX_FIELD='value' is invalid: why; fix`."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    reason = first["msg"].removeprefix("Value error, ")
    hint = hints.get(name, "fix or unset it")
    value = first.get("input")
    shown = redact_text(repr(value))  # e.g. a database URL with its password
    return ConfigError(f"{prefix}{name.upper()}={shown} is invalid: {redact_text(reason)}; {hint}")


def check_log_level(value: str) -> str:
    """A settings validator's body: the level in lower case, or a ValueError naming it."""
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {value!r}")
    return value.lower()


def make_socket(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A bound TCP socket; with `reuse_port` other processes may bind the same port too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def check_port(host: str, port: int, variable: str) -> None:
    """A ConfigError naming `variable` when `host:port` cannot be listened on (busy, no rights).

    The probe does not share the port (no SO_REUSEPORT), so a port that another server holds is
    refused even when that server allows sharing: two servers must never split one port's traffic.
    """
    try:
        with make_socket(host, port, reuse_port=False) as sock:
            sock.listen(1)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; set {variable} (or --port) "
            "to a free port, or stop the server that holds it"
        ) from exc


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, plus opsloop's loggers on the same handler and level."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    # Not propagated: the CLI's root handler would print every record a second time.
    config["loggers"]["opsloop"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def serve_app(app: Any, settings: ServiceSettings) -> None:
    """Run a service's ASGI app under uvicorn on its host and port until SIGINT/SIGTERM, with
    opsloop's logging, no access log and no server header (what the monitor and the loop share;
    the inference server runs its own workers)."""
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level),
        access_log=False,
        server_header=False,
    )
