"""The opsloop error hierarchy.

Every error a user can cause is an `OpsloopError` raised where the bad value enters, with a one-line
message that names the value and says how to fix it. The CLI turns it into `error: <message>` and
the exit code the class carries: 2 for usage and configuration mistakes, 1 for runtime failures.
"""

from __future__ import annotations


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
    """A drift check cannot run: the window is empty or too small, or the log cannot be read."""
