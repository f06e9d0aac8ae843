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
    Select,
    String,
    Table,
    and_,
    create_engine,
    event,
    func,
    inspect,
    literal,
    null,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError, SQLAlchemyError

from opsloop.errors import PredictionLogError, first_line, redact_url

logger = logging.getLogger(__name__)

PREDLOG_URL_ENV = "OPSLOOP_PREDLOG_URL"
WORKSPACE_ENV = "OPSLOOP_WORKSPACE"
LOG_OFF = "none"  # OPSLOOP_PREDLOG_URL=none switches the server's log off
MAX_REQUEST_ID = 128  # characters; longer ids are refused where they enter
CHAMPION_ROLE, CANARY_ROLE, SHADOW_ROLE = "champion", "canary", "shadow"
ROLES = (CHAMPION_ROLE, CANARY_ROLE, SHADOW_ROLE)
NO_LABEL = -1  # `true_labels` of a prediction no label has arrived for
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
    # Who answered: the champion, a canary (answered by the challenger) or a shadow (the
    # challenger's answer to the same request, logged but never returned).
    Column("role", String(16), nullable=False, server_default=CHAMPION_ROLE),
    Index("ix_predictions_created_at", "created_at"),
    Index("ix_predictions_model_version", "model_version"),
)
# Labels that arrive later (`POST /feedback`), one row per event: the newest row for a
# (request_id, item) is its label, the older ones record how it changed. No foreign key: a label
# may arrive before its prediction is flushed, or for a request this log never saw.
feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(MAX_REQUEST_ID), nullable=False),
    Column("item", Integer, nullable=False),
    Column("label", Integer, nullable=False),  # the class index in the served model's classes
    Column("created_at", Float, nullable=False),  # when the label arrived (Unix seconds)
    Index("ix_feedback_request_item", "request_id", "item"),
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


@dataclass(frozen=True)
class EngineOptions:
    """Connection pool and timeouts of a server database (PostgreSQL); SQLite ignores them.

    Each process holds at most `pool_size` connections, waits `pool_timeout_s` for a free one
    and `connect_timeout_s` for the server to answer a new connection (a host that is down
    fails in that time instead of hanging). Connections are pinged before use, so a database
    that restarted is reconnected to, not reported broken.
    """

    pool_size: int = 5
    pool_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0


def open_engine(url: str, *, create: bool, options: EngineOptions | None = None) -> Engine:
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
        options = options or EngineOptions()
        pool: dict[str, Any] = {
            "pool_size": options.pool_size,
            "max_overflow": 0,
            "pool_timeout": options.pool_timeout_s,
        }
        if parsed.get_backend_name() == "postgresql":  # libpq's own option: whole seconds, >= 2
            pool["connect_args"] = {"connect_timeout": max(2, round(options.connect_timeout_s))}
        try:
            return create_engine(url, pool_pre_ping=True, **pool)
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
    """Create the log's tables if missing; tolerate another process creating them meanwhile.

    A log written by an older opsloop gets the columns added since (each with a default), so
    upgrading never needs a new database.
    """
    try:
        metadata.create_all(engine)
    except (OperationalError, ProgrammingError):
        # Two workers starting together both see no table and both CREATE it; the loser fails.
        # It is fine exactly when the tables exist now.
        if not all(inspect(engine).has_table(table) for table in metadata.tables):
            raise
    add_missing_columns(engine)
    logger.debug("prediction log schema ready at %s", redact_url(str(engine.url)))


def add_missing_columns(engine: Engine) -> None:
    """`ALTER TABLE ... ADD COLUMN` for each column (with a server default) a table lacks."""
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or column.server_default is None:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            default = column.server_default.arg  # type: ignore[attr-defined]
            statement = (
                f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind} "
                f"NOT NULL DEFAULT '{default}'"
            )
            try:
                with engine.begin() as connection:
                    connection.exec_driver_sql(statement)
            except (OperationalError, ProgrammingError):
                # Another process added it first: fine exactly when the column is there now.
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
            logger.info("prediction log: added column %s.%s", table.name, column.name)


@dataclass(frozen=True)
class LoggedPredictions:
    """Rows read back from the log, arrays decoded, each with its label if one has arrived."""

    request_ids: list[str]
    items: npt.NDArray[np.int64]
    created_at: npt.NDArray[np.float64]
    model_names: list[str]
    model_versions: list[str]
    roles: list[str]
    endpoints: list[str]
    inputs: list[npt.NDArray[np.float32]]
    probabilities: npt.NDArray[np.float32]
    embeddings: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]  # what the model predicted
    latency_ms: npt.NDArray[np.float64]
    true_labels: npt.NDArray[np.int64]  # the newest label that arrived, or NO_LABEL
    labelled_at: npt.NDArray[np.float64]  # when it arrived, or NaN

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def labelled(self) -> npt.NDArray[np.bool_]:
        """Which rows have a label."""
        return np.asarray(self.true_labels != NO_LABEL, dtype=np.bool_)

    def where(self, mask: npt.NDArray[np.bool_]) -> LoggedPredictions:
        """The rows where `mask` is true, in order."""
        keep = np.flatnonzero(mask)
        return LoggedPredictions(
            request_ids=[self.request_ids[i] for i in keep],
            items=self.items[keep],
            created_at=self.created_at[keep],
            model_names=[self.model_names[i] for i in keep],
            model_versions=[self.model_versions[i] for i in keep],
            roles=[self.roles[i] for i in keep],
            endpoints=[self.endpoints[i] for i in keep],
            inputs=[self.inputs[i] for i in keep],
            probabilities=self.probabilities[keep],
            embeddings=self.embeddings[keep],
            labels=self.labels[keep],
            latency_ms=self.latency_ms[keep],
            true_labels=self.true_labels[keep],
            labelled_at=self.labelled_at[keep],
        )


def read_predictions(
    url: str,
    *,
    limit: int | None = None,
    since: float | None = None,
    roles: Sequence[str] | None = None,
    request_id: str | None = None,
) -> LoggedPredictions:
    """The most recent `limit` rows (oldest first) with their labels joined.

    Filters: rows at or after Unix time `since`, of the given `roles` (e.g. `["champion",
    "canary"]`, which leaves shadow answers out), or of one request. A log that cannot be opened
    or read is a `PredictionLogError` naming the (redacted) URL.
    """
    if limit is not None and limit < 1:
        raise PredictionLogError(f"limit={limit} must be at least 1 prediction")
    engine = open_engine(url, create=False)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            columns = {column["name"] for column in inspector.get_columns(predictions.name)}
            query = _labelled_query(
                has_feedback=inspector.has_table(feedback.name), has_role="role" in columns
            )
            if since is not None:
                query = query.where(predictions.c.created_at >= since)
            if roles is not None:
                query = query.where(predictions.c.role.in_(list(roles)))
            if request_id is not None:
                query = query.where(predictions.c.request_id == request_id)
            if limit is not None:
                query = query.limit(limit)
            rows = list(reversed(connection.execute(query).all()))
    except SQLAlchemyError as exc:
        raise PredictionLogError(
            f"cannot read the prediction log {redact_url(url)}: {first_line(exc)}; check the "
            f"URL (--log or {PREDLOG_URL_ENV}) and that `opsloop serve` has logged to it"
        ) from exc
    finally:
        engine.dispose()
    return _decoded(rows)


def _labelled_query(*, has_feedback: bool, has_role: bool) -> Select[Any]:
    """Predictions, newest first, each outer-joined with the newest label for its example.

    A log written by an older opsloop (no `role` column, no `feedback` table) reads as champion
    answers without labels, until a server upgrades it (`ensure_schema`).
    """
    newest = predictions.c.id.desc()
    columns: list[Any] = [c for c in predictions.columns if has_role or c.name != "role"]
    if not has_role:
        columns.append(literal(CHAMPION_ROLE).label("role"))
    if not has_feedback:
        return select(
            *columns,
            literal(NO_LABEL).label("true_label"),
            null().label("labelled_at"),
        ).order_by(newest)
    last = (
        select(func.max(feedback.c.id).label("id"))
        .group_by(feedback.c.request_id, feedback.c.item)
        .subquery()
    )
    label = select(feedback).join(last, feedback.c.id == last.c.id).subquery()
    joined = predictions.outerjoin(
        label,
        and_(label.c.request_id == predictions.c.request_id, label.c.item == predictions.c.item),
    )
    return (
        select(
            *columns,
            func.coalesce(label.c.label, NO_LABEL).label("true_label"),
            label.c.created_at.label("labelled_at"),
        )
        .select_from(joined)
        .order_by(newest)
    )


def _decoded(rows: Sequence[Any]) -> LoggedPredictions:
    return LoggedPredictions(
        request_ids=[row.request_id for row in rows],
        items=np.array([row.item for row in rows], dtype=np.int64),
        created_at=np.array([row.created_at for row in rows], dtype=np.float64),
        model_names=[row.model_name for row in rows],
        model_versions=[row.model_version for row in rows],
        roles=[row.role for row in rows],
        endpoints=[row.endpoint for row in rows],
        inputs=[decode_input(row.input, row.input_dtype, row.input_shape) for row in rows],
        probabilities=_stack([row.probabilities for row in rows]),
        embeddings=_stack([row.embedding for row in rows]),
        labels=np.array([row.label for row in rows], dtype=np.int64),
        latency_ms=np.array([row.latency_ms for row in rows], dtype=np.float64),
        true_labels=np.array([row.true_label for row in rows], dtype=np.int64),
        labelled_at=np.array(
            [np.nan if row.labelled_at is None else row.labelled_at for row in rows],
            dtype=np.float64,
        ),
    )


@dataclass(frozen=True)
class LabelEvent:
    """One label as it arrived, for `opsloop trace` and audits."""

    request_id: str
    item: int
    label: int
    created_at: float


def read_label_events(url: str, request_id: str) -> list[LabelEvent]:
    """Every label that arrived for `request_id`, oldest first (the last one per item counts)."""
    engine = open_engine(url, create=False)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table(feedback.name):
                return []
            query = select(feedback).where(feedback.c.request_id == request_id)
            rows = connection.execute(query.order_by(feedback.c.id)).all()
    except SQLAlchemyError as exc:
        raise PredictionLogError(
            f"cannot read the labels in {redact_url(url)}: {first_line(exc)}"
        ) from exc
    finally:
        engine.dispose()
    return [LabelEvent(r.request_id, r.item, r.label, r.created_at) for r in rows]


def decode_input(data: bytes, dtype: str, shape: str) -> npt.NDArray[np.float32]:
    """A logged input back as float32 of its original shape."""
    array = np.frombuffer(data, dtype=np.uint8 if dtype == "uint8" else "<f4")
    return array.astype(np.float32).reshape(orjson.loads(shape))


def _stack(blobs: Sequence[bytes]) -> npt.NDArray[np.float32]:
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.frombuffer(blob, dtype="<f4") for blob in blobs])
