"""The `opsloop` command line: thin — parse, load config, call one stage, print the result.

Each command takes Hydra overrides after its name (`opsloop data data=mnist data.seed=1`).
Errors print one line `error: ...` and exit 2 (usage/config) or 1 (runtime); the traceback is
shown only with `--log-level debug`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console

from opsloop import __version__
from opsloop.errors import OpsloopError

logger = logging.getLogger("opsloop")

app = typer.Typer(
    name="opsloop",
    help="The ML -> DEV -> OPS loop: data, training, registry, serving and monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

OVERRIDES_HELP = "Hydra overrides, e.g. data=mnist data.val_fraction=0.2"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _show_version(value: bool) -> None:
    if value:
        console.print(f"opsloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: LogLevel = typer.Option(
        LogLevel.info, "--log-level", "-l", help="Logging verbosity.", case_sensitive=False
    ),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """opsloop: versioned data, tracked training, gated registry, fast serving, drift monitoring."""
    configure_logging(log_level.value)


def configure_logging(level: str) -> None:
    """Configure logging once, for the CLI process only (the library never configures it)."""
    handler = CurrentStderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (it may be swapped, e.g. by test capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # always follow sys.stderr


@app.command("data")
def data_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Prepare a dataset into data/processed/<name>/ (a no-op when nothing changed)."""
    from opsloop.config import load_config
    from opsloop.data import prepare_dataset

    cfg = load_config(overrides or [])
    result = prepare_dataset(cfg.data)
    print_fields(
        f"dataset {result.name}",
        {
            "path": str(result.path),
            "counts": ", ".join(f"{k}={v}" for k, v in result.counts.items()),
            "classes": str(result.manifest.num_classes),
            "image shape": "x".join(str(d) for d in result.manifest.image_shape),
            "content hash": result.content_hash,
            "status": "written" if result.written else "up to date, nothing rewritten",
        },
    )


def print_fields(title: str, fields: dict[str, str]) -> None:
    """A stage's result as aligned `key  value` lines: readable, and never wrapped mid-value."""
    width = max(len(key) for key in fields)
    console.print(title, style="bold", soft_wrap=True, highlight=False)
    for key, value in fields.items():
        console.print(f"  {key:<{width}}  {value}", soft_wrap=True, highlight=False, markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the app and turn every failure into one line and an exit code."""
    command = typer.main.get_command(app)
    debug = _wants_debug(sys.argv[1:] if argv is None else list(argv))
    try:
        result = command.main(
            args=None if argv is None else list(argv), prog_name="opsloop", standalone_mode=False
        )
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        _fail("aborted")
        return 130
    except typer.TyperException as exc:  # Typer's (vendored) click usage and parameter errors
        _fail(_usage_message(exc))
        return int(getattr(exc, "exit_code", 2))
    except OpsloopError as exc:
        if debug:
            logger.exception("failed")
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # an unexpected bug: still one line unless debugging
        if debug:
            logger.exception("unexpected failure")
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --log-level debug for details)")
        return 1
    return result if isinstance(result, int) else 0


def _usage_message(exc: Exception) -> str:
    """The error text plus where to look for help, naming the (sub)command."""
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "opsloop"
    return f"{message} (see '{path} --help')"


def _fail(message: str) -> None:
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"error: {' '.join(message.split())}", markup=False
    )


def _wants_debug(args: Sequence[str]) -> bool:
    joined = " ".join(args).lower()
    return "--log-level debug" in joined or "--log-level=debug" in joined or "-l debug" in joined
