"""The prediction log's schema and read side, shared by serve, monitor, loop and ui.

The server appends one row per served example (`opsloop.serve.predlog` is the write side); the
monitor, the loop and the UI read them back here as numpy arrays. Any SQLAlchemy URL works: SQLite
in WAL mode is the default (several writer processes and readers share one file), PostgreSQL in
production. Arrays are stored as raw little-endian bytes with their dtype and shape, so
`np.frombuffer(row.probabilities, "<f4")` reads them back without unpickling anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import (
    Column,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from opsloop.errors import PredictionLogError, first_line, redact_url

logger = logging.getLogger(__name__)

PREDLOG_URL_ENV = "OPSLOOP_PREDLOG_URL"
WORKSPACE_ENV = "OPSLOOP_WORKSPACE"
LOG_OFF = "none"  # OPSLOOP_PREDLOG_URL=none switches the server's log off
metadata = MetaData()
predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("item", Integer, nullable=False),  # the example's row within its request
    Column("created_at", Float, nullable=False),  # Unix time in seconds (UTC)
    Column("endpoint", String(16), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("input", LargeBinary, nullable=False),  # the example exactly as the model saw it
    Column("input_dtype", String(8), nullable=False),  # uint8 when lossless, else float32
    Column("input_shape", String(64), nullable=False),  # JSON, e.g. [1, 8, 8]
    Column("probabilities", LargeBinary, nullable=False),  # float32
    Column("embedding", LargeBinary, nullable=False),  # float32
    Column("label", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Index("ix_predictions_created_at", "created_at"),
    Index("ix_predictions_model_version", "model_version"),
)


def default_log_url() -> str:
    """The log `opsloop serve` writes with the same environment: `OPSLOOP_PREDLOG_URL`, else
    `predictions.db` in `OPSLOOP_WORKSPACE` (default: the current directory)."""
    from opsloop.workspace import Workspace

    url = os.environ.get(PREDLOG_URL_ENV, "").strip()
    if url == LOG_OFF:
        raise PredictionLogError(
            f"{PREDLOG_URL_ENV}=none: the server keeps no prediction log to read; unset it or "
            "pass the log's URL with --log"
        )
    return url or Workspace(Path(os.environ.get(WORKSPACE_ENV) or ".")).predictions_url


def open_engine(url: str, *, create: bool) -> Engine:
    """An engine for the log; SQLite gets WAL mode and a generous lock timeout.

    With `create` a missing SQLite file (and its directory) is made, as the writer wants;
    without it a missing file is a `PredictionLogError`, because connecting would silently make
    an empty one and a reader would report "no predictions" instead of the wrong path.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise PredictionLogError(
            f"prediction-log URL {redact_url(url)!r} is invalid: {first_line(exc)}; use a "
            f"SQLAlchemy URL such as sqlite:///predictions.db ({PREDLOG_URL_ENV})"
        ) from exc
    if parsed.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError) as exc:  # an unknown dialect or a missing driver
            raise PredictionLogError(
                f"prediction-log URL {redact_url(url)!r} is invalid: {first_line(exc)}; use a "
                f"URL of an installed database driver, e.g. postgresql://... ({PREDLOG_URL_ENV})"
            ) from exc
    if parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database).expanduser()
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise PredictionLogError(
                f"prediction log {path} does not exist; start `opsloop serve` (it logs there) "
                f"or point --log / {PREDLOG_URL_ENV} at the server's log"
            )
    engine = create_engine(url, connect_args={"timeout": 30})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets several writer processes and monitoring readers share the file without blocking
    # readers; NORMAL sync is durable across application crashes (not power loss) and much faster.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def ensure_schema(engine: Engine) -> None:
    """Create the log's tables if missing; tolerate another process creating them meanwhile."""
    try:
        metadata.create_all(engine)
    except OperationalError:
        # Two workers starting together both see no table and both CREATE it; the loser fails.
        # It is fine exactly when the tables exist now.
        if not all(inspect(engine).has_table(table) for table in metadata.tables):
            raise
    logger.debug("prediction log schema ready at %s", redact_url(str(engine.url)))


@dataclass(frozen=True)
class LoggedPredictions:
    """Rows read back from the log, arrays decoded (for monitoring, the loop and tests)."""

    request_ids: list[str]
    items: npt.NDArray[np.int64]
    created_at: npt.NDArray[np.float64]
    model_versions: list[str]
    endpoints: list[str]
    inputs: list[npt.NDArray[np.float32]]
    probabilities: npt.NDArray[np.float32]
    embeddings: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    latency_ms: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.request_ids)


def read_predictions(
    url: str, *, limit: int | None = None, since: float | None = None
) -> LoggedPredictions:
    """The most recent `limit` rows (oldest first), optionally only those at or after `since`.

    A log that cannot be opened or read is a `PredictionLogError` naming the (redacted) URL.
    """
    if limit is not None and limit < 1:
        raise PredictionLogError(f"limit={limit} must be at least 1 prediction")
    engine = open_engine(url, create=False)
    query = select(predictions).order_by(predictions.c.id.desc())
    if since is not None:
        query = query.where(predictions.c.created_at >= since)
    if limit is not None:
        query = query.limit(limit)
    try:
        with engine.connect() as connection:
            rows = list(reversed(connection.execute(query).all()))
    except SQLAlchemyError as exc:
        raise PredictionLogError(
            f"cannot read the prediction log {redact_url(url)}: {first_line(exc)}; check the "
            f"URL (--log or {PREDLOG_URL_ENV}) and that `opsloop serve` has logged to it"
        ) from exc
    finally:
        engine.dispose()
    return LoggedPredictions(
        request_ids=[row.request_id for row in rows],
        items=np.array([row.item for row in rows], dtype=np.int64),
        created_at=np.array([row.created_at for row in rows], dtype=np.float64),
        model_versions=[row.model_version for row in rows],
        endpoints=[row.endpoint for row in rows],
        inputs=[decode_input(row.input, row.input_dtype, row.input_shape) for row in rows],
        probabilities=_stack([row.probabilities for row in rows]),
        embeddings=_stack([row.embedding for row in rows]),
        labels=np.array([row.label for row in rows], dtype=np.int64),
        latency_ms=np.array([row.latency_ms for row in rows], dtype=np.float64),
    )


def decode_input(data: bytes, dtype: str, shape: str) -> npt.NDArray[np.float32]:
    """A logged input back as float32 of its original shape."""
    array = np.frombuffer(data, dtype=np.uint8 if dtype == "uint8" else "<f4")
    return array.astype(np.float32).reshape(orjson.loads(shape))


def _stack(blobs: Sequence[bytes]) -> npt.NDArray[np.float32]:
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.frombuffer(blob, dtype="<f4") for blob in blobs])
