"""The opsloop error hierarchy, and the two helpers every error message uses.

Every error a user can cause is an `OpsloopError` raised where the bad value enters, with a one-line
message that names the value and says how to fix it. The CLI turns it into `error: <message>` and
the exit code the class carries: 2 for usage and configuration mistakes, 1 for runtime failures.
`first_line` condenses a library's multi-line exception for such a message, and `redact_url`
hides the password of a database or server URL before it is shown anywhere.
"""

from __future__ import annotations

import re


class OpsloopError(Exception):
    """Base class: a failure the user can understand and fix from its one-line message."""

    exit_code = 1


class ConfigError(OpsloopError):
    """A configuration value or command-line override is unknown, mistyped or out of range."""

    exit_code = 2


class DataError(OpsloopError):
    """Input data is missing, unreadable, corrupt or inconsistent."""


class DownloadError(DataError):
    """A dataset file could not be downloaded or failed its checksum."""


class TrackingError(OpsloopError):
    """The experiment tracker (MLflow) cannot be reached or refused a request."""


class CheckpointError(OpsloopError):
    """A model checkpoint is missing, corrupt or belongs to another model shape."""


class ModelNotFoundError(OpsloopError):
    """A registered model, version, alias or bundle does not exist."""


class BundleError(OpsloopError):
    """A model bundle is incomplete, tampered with or does not match its checksum."""


class ExportError(OpsloopError):
    """An export failed its checks (e.g. ONNX parity with the torch model); nothing was written."""


class MonitorError(OpsloopError):
    """A drift check cannot run: the window is too small or malformed, or the log is unreadable."""


class PredictionLogError(MonitorError):
    """The prediction log cannot be opened or read (a missing file, a bad URL, a down database)."""


class EmptyWindowError(MonitorError):
    """The prediction log holds no predictions in the window asked for: too early, not broken."""


class MissingExtraError(OpsloopError):
    """A feature needs an optional extra (e.g. `opsloop[monitor]`) that is not installed."""

    def __init__(self, feature: str, extra: str, missing: str) -> None:
        super().__init__(
            f"{feature} needs the '{extra}' extra ({missing} is not installed); "
            f"install it with `pip install 'opsloop[{extra}]'`"
        )
        self.extra = extra


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (any URL password in it hidden), or
    its type's name when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return redact_text(line.strip())
    return type(exc).__name__


# `scheme://user:password@` anywhere in a text: the password is what goes.
_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (for messages that quote a
    URL among other words: a driver's error, a settings value)."""
    return _CREDENTIALS.sub(r"\g<head>***@", text)


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, fit for logs, errors and health bodies.

    Database URLs go through SQLAlchemy's parser; anything it cannot parse (an http URL with
    credentials, garbage) is redacted by hand, and never returned with its secret.
    """
    from urllib.parse import urlsplit, urlunsplit

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return str(make_url(url).render_as_string(hide_password=True))
    except (ArgumentError, ValueError, TypeError):
        pass
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
