"""The prediction log's schema and read side, shared by serve, monitor, loop and ui.

The server appends one row per served example (`opsloop.serve.predlog` is the write side); the
monitor, the loop and the UI read them back here as numpy arrays. Any SQLAlchemy URL works: SQLite
in WAL mode is the default (several writer processes and readers share one file), PostgreSQL in
production. Arrays are stored as raw little-endian bytes with their dtype and shape, so
`np.frombuffer(row.probabilities, "<f4")` reads them back without unpickling anything.

Why one file of ~580 lines: the log's schema, its id blocks, the migration of the 0.1 layout
and every read of it change together; the write side stays in `opsloop.serve`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import (
    Column,
    Connection,
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
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)

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
# One row per answered request (per role: a shadow answer to a request is a row of its own).
# What a request shares — its id, time, model, encodings — is stored here once, not per example.
requests = Table(
    "prediction_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # from `id_blocks`
    Column("request_id", String(MAX_REQUEST_ID), nullable=False, index=True),
    Column("created_at", Float, nullable=False),  # Unix time in seconds (UTC)
    Column("endpoint", String(16), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    # Who answered: the champion, a canary (answered by the challenger) or a shadow (the
    # challenger's answer to the same request, logged but never returned).
    Column("role", String(16), nullable=False),
    Column("latency_ms", Float, nullable=False),
    # The share of requests the server logged when it logged this one (`OPSLOOP_PREDLOG_SAMPLE`):
    # each logged request stands for 1/sample_rate served ones.
    Column("sample_rate", Float, nullable=False),
    Column("input_dtype", String(8), nullable=False),  # uint8 when lossless, else float32
    Column("input_shape", String(64), nullable=False),  # one example's, JSON, e.g. [1, 8, 8]
    Column("embedding_dtype", String(8), nullable=False),  # "<f2"; probabilities are float32
    Index("ix_prediction_requests_created_at", "created_at"),
)
# One row per example, keyed by (request, item) and stored in that order (no rowid on SQLite).
items = Table(
    "prediction_items",
    metadata,
    Column("request", Integer, primary_key=True, autoincrement=False),
    Column("item", Integer, primary_key=True, autoincrement=False),  # the row in its request
    Column("input", LargeBinary, nullable=False),  # the example exactly as the model saw it
    Column("probabilities", LargeBinary, nullable=False),  # float32
    # The embedding, in half precision, in the bundle's log basis (its leading principal
    # components) or whole when the bundle has no basis: what drift detection and the estimate
    # need, compactly.
    Column("embedding", LargeBinary, nullable=False),
    Column("label", Integer, nullable=False),  # what the model predicted (the argmax)
    sqlite_with_rowid=False,
)
# Request ids handed out in blocks: each ingester takes the next block in its own transaction,
# so several ingesters (servers) can write one database without colliding.
id_blocks = Table(
    "prediction_ids",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("next_id", Integer, nullable=False),
)
LEGACY_TABLE = "predictions"  # one row per example, every request field repeated (<= 0.1)
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

# How far the ingester has committed each journal segment (`opsloop.serve.ingest`): written in
# the same transaction as the segment's rows, which is what makes ingestion exactly-once.
journal_offsets = Table(
    "journal_offsets",
    metadata,
    Column("segment", String(255), primary_key=True),
    Column("committed", Integer, nullable=False),  # bytes from the segment's start
    Column("updated_at", Float, nullable=False),
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
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA mmap_size=268435456")
    cursor.close()


def ensure_schema(engine: Engine) -> None:
    """Create the log's tables if missing; tolerate another process creating them meanwhile.

    A log written by opsloop 0.1 (one `predictions` table) is migrated into the current tables
    in one transaction the first time, so upgrading never needs a new database.
    """
    try:
        metadata.create_all(engine)
    except (OperationalError, ProgrammingError, IntegrityError):
        # Two processes starting together both see no table and both CREATE it; the loser fails
        # (PostgreSQL: a unique violation in its catalog). Fine exactly when the tables exist now.
        if not all(inspect(engine).has_table(table) for table in metadata.tables):
            raise
    ensure_id_block_row(engine)
    if inspect(engine).has_table(LEGACY_TABLE):
        migrate_legacy(engine)
    logger.debug("prediction log schema ready at %s", redact_url(str(engine.url)))


def ensure_id_block_row(engine: Engine) -> None:
    """The request-id counter's row, starting after any request already in the log."""
    with engine.begin() as connection:
        if connection.execute(select(id_blocks.c.next_id)).first() is not None:
            return
        highest = connection.execute(select(func.max(requests.c.id))).scalar()
        try:
            with connection.begin_nested():
                connection.execute(
                    id_blocks.insert().values(name=requests.name, next_id=(highest or 0) + 1)
                )
        except IntegrityError:
            pass  # another process made it first


def take_ids(connection: Connection, count: int) -> int:
    """Reserve `count` request ids in this transaction; the first of them.

    The UPDATE takes the counter row's write lock first, so concurrent ingesters (on PostgreSQL,
    or several servers sharing one SQLite file) each get a block of their own.
    """
    connection.execute(
        update(id_blocks)
        .where(id_blocks.c.name == requests.name)
        .values(next_id=id_blocks.c.next_id + count)
    )
    after = connection.execute(
        select(id_blocks.c.next_id).where(id_blocks.c.name == requests.name)
    ).scalar_one()
    return int(after) - count


def migrate_legacy(engine: Engine) -> None:
    """Move a 0.1 log (`predictions`: one row per example) into the current tables, then drop it.

    One request row per (request id, model version, role), its examples as items; float32
    outputs keep their dtype. In one transaction: a crash leaves the old table as it was.
    """
    legacy = Table(LEGACY_TABLE, MetaData(), autoload_with=engine)
    role = legacy.c.role if "role" in legacy.c else literal(CHAMPION_ROLE)
    with engine.begin() as connection:
        rows = connection.execute(select(legacy, role.label("role_")).order_by(legacy.c.id)).all()
        first = take_ids(connection, len(rows)) if rows else 0
        request_ids: dict[tuple[str, str, str], int] = {}
        request_rows, item_rows = [], []
        for row in rows:
            identity = (row.request_id, row.model_version, row.role_)
            if identity not in request_ids:
                request_ids[identity] = first + len(request_ids)
                request_rows.append(_legacy_request(row, request_ids[identity]))
            item_rows.append(_legacy_item(row, request_ids[identity]))
        if request_rows:
            connection.execute(requests.insert(), request_rows)
            connection.execute(items.insert(), item_rows)
        legacy.drop(connection)
    logger.info(
        "prediction log: migrated %d predictions of %d requests from the 0.1 table",
        len(item_rows),
        len(request_rows),
    )


def _legacy_request(row: Any, request: int) -> dict[str, Any]:
    return {
        "id": request,
        "request_id": row.request_id,
        "created_at": row.created_at,
        "endpoint": row.endpoint,
        "model_name": row.model_name,
        "model_version": row.model_version,
        "role": row.role_,
        "latency_ms": row.latency_ms,
        "sample_rate": 1.0,
        "input_dtype": row.input_dtype,
        "input_shape": _item_shape(row.input_shape),
        "embedding_dtype": "<f4",
    }


def _legacy_item(row: Any, request: int) -> dict[str, Any]:
    return {
        "request": request,
        "item": row.item,
        "input": row.input,
        "probabilities": row.probabilities,
        "embedding": row.embedding,
        "label": row.label,
    }


def _item_shape(shape: str) -> str:
    """One example's shape, as JSON: 0.1 logs stored it with a leading 1 (e.g. [1, 8, 8])."""
    return orjson.dumps(orjson.loads(shape)).decode()


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
    # The share of requests logged when each row was (1.0 unless the server samples).
    sample_rates: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.float64)
    )

    def __post_init__(self) -> None:
        if len(self.sample_rates) != len(self.request_ids):  # not given: every row was logged
            object.__setattr__(self, "sample_rates", np.ones(len(self.request_ids)))

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
            sample_rates=self.sample_rates[keep],
        )

    @property
    def served(self) -> float:
        """How many served predictions these rows stand for (each 1/sample_rate)."""
        return float((1.0 / self.sample_rates).sum())


def read_predictions(
    url: str,
    *,
    limit: int | None = None,
    since: float | None = None,
    roles: Sequence[str] | None = None,
    request_id: str | None = None,
    labels_until: float | None = None,
) -> LoggedPredictions:
    """The most recent `limit` rows (oldest first) with their labels joined.

    Filters: rows at or after Unix time `since`, of the given `roles` (e.g. `["champion",
    "canary"]`, which leaves shadow answers out), or of one request. With `labels_until`, labels
    (and predictions) later than that Unix time are left out: the log as it was then. A log
    that cannot be opened or read is a `PredictionLogError` naming the (redacted) URL. A log
    that has no tables yet (a server that has not logged anything) reads as empty.
    """
    if limit is not None and limit < 1:
        raise PredictionLogError(f"limit={limit} must be at least 1 prediction")
    engine = open_engine(url, create=False)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            if inspector.has_table(LEGACY_TABLE) or not inspector.has_table(requests.name):
                return _legacy_or_empty(legacy=inspector.has_table(LEGACY_TABLE))
            query = _labelled_query(
                has_feedback=inspector.has_table(feedback.name), labels_until=labels_until
            )
            if labels_until is not None:
                query = query.where(requests.c.created_at <= labels_until)
            if since is not None:
                query = query.where(requests.c.created_at >= since)
            if roles is not None:
                query = query.where(requests.c.role.in_(list(roles)))
            if request_id is not None:
                query = query.where(requests.c.request_id == request_id)
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


def _legacy_or_empty(*, legacy: bool) -> LoggedPredictions:
    """No current tables: nothing logged yet, or a 0.1 log that no server has migrated yet."""
    if legacy:
        raise PredictionLogError(
            "the prediction log was written by opsloop 0.1; start `opsloop serve` (or any "
            "opsloop that writes it) once to migrate it"
        )
    return _decoded([])


def _labelled_query(*, has_feedback: bool, labels_until: float | None = None) -> Select[Any]:
    """Examples with their request, newest first, each outer-joined with its newest label (as
    of `labels_until`, when given)."""
    joined = items.join(requests, requests.c.id == items.c.request)
    newest = (items.c.request.desc(), items.c.item.desc())
    columns = [*requests.columns, *(c for c in items.columns if c.name != "request")]
    if not has_feedback:
        return (
            select(*columns, literal(NO_LABEL).label("true_label"), null().label("labelled_at"))
            .select_from(joined)
            .order_by(*newest)
        )
    arrived = select(func.max(feedback.c.id).label("id"))
    if labels_until is not None:
        arrived = arrived.where(feedback.c.created_at <= labels_until)
    last = arrived.group_by(feedback.c.request_id, feedback.c.item).subquery()
    label = select(feedback).join(last, feedback.c.id == last.c.id).subquery()
    joined = joined.outerjoin(
        label,
        and_(label.c.request_id == requests.c.request_id, label.c.item == items.c.item),
    )
    return (
        select(
            *columns,
            func.coalesce(label.c.label, NO_LABEL).label("true_label"),
            label.c.created_at.label("labelled_at"),
        )
        .select_from(joined)
        .order_by(*newest)
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
        probabilities=_stack([(row.probabilities, "<f4") for row in rows]),
        embeddings=_stack([(row.embedding, row.embedding_dtype) for row in rows]),
        labels=np.array([row.label for row in rows], dtype=np.int64),
        latency_ms=np.array([row.latency_ms for row in rows], dtype=np.float64),
        true_labels=np.array([row.true_label for row in rows], dtype=np.int64),
        labelled_at=np.array(
            [np.nan if row.labelled_at is None else row.labelled_at for row in rows],
            dtype=np.float64,
        ),
        sample_rates=np.array([row.sample_rate for row in rows], dtype=np.float64),
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


def _stack(blobs: Sequence[tuple[bytes, str]]) -> npt.NDArray[np.float32]:
    """Rows of (bytes, dtype) as one float32 matrix as wide as the newest row.

    Rows of another width (the embedding of a model with another log basis) are NaN: a reader
    that compares embeddings keeps only the rows of the width it expects.
    """
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    arrays = [np.frombuffer(blob, dtype=dtype) for blob, dtype in blobs]
    width = len(arrays[-1])
    matrix = np.full((len(arrays), width), np.nan, dtype=np.float32)
    for index, array in enumerate(arrays):
        if len(array) == width:
            matrix[index] = array
    return matrix


def count_labels(url: str, *, since: float | None = None) -> int:
    """Distinct labelled examples whose (newest) label arrived at or after `since`."""
    engine = open_engine(url, create=False)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table(feedback.name):
                return 0
            query = select(feedback.c.request_id, feedback.c.item).distinct()
            if since is not None:
                query = query.where(feedback.c.created_at >= since)
            return int(
                connection.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            )
    except SQLAlchemyError as exc:
        raise PredictionLogError(
            f"cannot count the labels in {redact_url(url)}: {first_line(exc)}"
        ) from exc
    finally:
        engine.dispose()
