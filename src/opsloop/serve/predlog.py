"""The prediction log's write side: every prediction appended to a SQL table, off the response path.

Requests hand a record to `PredictionLog.append` (a deque append that wakes nobody); a
background thread wakes every `flush_interval_s`, turns everything queued into rows and inserts
them in batches, one transaction each; `close()`, called on graceful shutdown (SIGTERM, Ctrl-C),
writes everything still queued. Records still queued when the process is killed outright are
lost. The table and its reader live in `opsloop.predictions`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import Connection, Engine, bindparam, insert
from sqlalchemy.exc import SQLAlchemyError

from opsloop.errors import ConfigError, OpsloopError, first_line, redact_url
from opsloop.predictions import ensure_schema, open_engine, predictions

logger = logging.getLogger(__name__)

RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One request's predictions, as queued by the request and expanded into rows later."""

    request_id: str
    created_at: float
    endpoint: str
    model_name: str
    model_version: str
    inputs: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32]
    embedding: npt.NDArray[np.float32]
    latency_ms: float


# The columns every row fills, in the order `rows_of` produces them (all but the `id` key).
COLUMNS = tuple(column.name for column in predictions.columns if column.name != "id")
Row = tuple[Any, ...]
# Rows per multi-row INSERT: 256 x 14 parameters stays far below SQLite's limit of 32766.
MULTIROW_CHUNK = 256


def rows_of(records: Sequence[LogRecord]) -> list[Row]:
    """The table rows (in `COLUMNS` order) for many records: one per example, in order.

    Vectorised over each run of same-shaped records and sliced from one buffer per array: this
    runs for every prediction inside the serving process, so its cost is paid in throughput.
    """
    rows: list[Row] = []
    for run in same_shape_runs(records):
        rows.extend(_rows_of_run(run))
    return rows


def same_shape_runs(records: Sequence[LogRecord]) -> list[list[LogRecord]]:
    """Consecutive records whose arrays can be concatenated (a model swap may change shapes)."""
    runs: list[list[LogRecord]] = []
    previous: tuple[Any, ...] | None = None
    for record in records:
        key = (record.inputs.shape[1:], record.probabilities.shape[1:], record.embedding.shape[1:])
        if key != previous:
            runs.append([])
            previous = key
        runs[-1].append(record)
    return runs


def _rows_of_run(run: Sequence[LogRecord]) -> list[Row]:
    inputs = np.concatenate([r.inputs for r in run]) if len(run) > 1 else run[0].inputs
    probabilities = np.concatenate([r.probabilities for r in run])
    embedding = np.concatenate([r.embedding for r in run])
    count = len(inputs)
    labels = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(count), labels].tolist()
    compact, dtype = compact_input(inputs)
    shape = orjson.dumps(inputs.shape[1:]).decode()
    input_bytes = _row_slices(compact, count)
    probability_bytes = _row_slices(np.ascontiguousarray(probabilities, "<f4"), count)
    embedding_bytes = _row_slices(np.ascontiguousarray(embedding, "<f4"), count)
    label_list = labels.tolist()
    rows: list[Row] = []
    index = 0
    for record in run:
        for item in range(len(record.inputs)):
            rows.append(
                (
                    record.request_id,
                    item,
                    record.created_at,
                    record.endpoint,
                    record.model_name,
                    record.model_version,
                    input_bytes[index],
                    dtype,
                    shape,
                    probability_bytes[index],
                    embedding_bytes[index],
                    label_list[index],
                    confidence[index],
                    record.latency_ms,
                )
            )
            index += 1
    return rows


def _row_slices(array: npt.NDArray[Any], count: int) -> list[bytes]:
    data = array.tobytes()
    size = len(data) // count
    return [data[i * size : (i + 1) * size] for i in range(count)]


def compact_input(examples: npt.NDArray[np.float32]) -> tuple[npt.NDArray[Any], str]:
    """As uint8 when that is lossless (whole numbers 0..255, e.g. decoded images), else float32."""
    rounded = np.rint(examples)
    if examples.min() >= 0 and examples.max() <= 255 and np.array_equal(rounded, examples):
        return rounded.astype(np.uint8), "uint8"
    return np.ascontiguousarray(examples, "<f4"), "float32"


def insert_rows(connection: Connection, rows: Sequence[Row]) -> None:
    """Insert straight through the DB driver, bypassing SQLAlchemy's per-row processing.

    The values are plain str/int/float/bytes that every driver takes as they are. With a
    positional parameter style (SQLite's `?`), rows go in multi-row INSERTs: the driver binds a
    whole chunk in C and releases the GIL once per statement rather than once per row, which
    the event loop sharing this process notices as throughput.
    """
    marker = {"qmark": "?", "format": "%s"}.get(connection.dialect.paramstyle)
    if marker is None:
        statement = insert(predictions).values({name: bindparam(name) for name in COLUMNS})
        sql = str(statement.compile(dialect=connection.dialect))
        connection.exec_driver_sql(sql, [dict(zip(COLUMNS, row, strict=True)) for row in rows])
        return
    head = f"INSERT INTO {predictions.name} ({', '.join(COLUMNS)}) VALUES "
    group = "(" + ", ".join([marker] * len(COLUMNS)) + ")"
    for start in range(0, len(rows), MULTIROW_CHUNK):
        chunk = rows[start : start + MULTIROW_CHUNK]
        values = tuple(value for row in chunk for value in row)
        connection.exec_driver_sql(head + ", ".join([group] * len(chunk)), values)


class PredictionLog:
    """Appends prediction records to the database from a background thread."""

    def __init__(
        self,
        url: str,
        *,
        batch_rows: int = 512,
        flush_interval_s: float = 0.2,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.on_written = on_written
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.rows_written = 0
        self.write_errors = 0
        # A deque, not a queue.Queue: appending wakes no thread. The writer wakes on its own
        # timer and takes everything at once, so the serving thread never hands it the GIL per
        # prediction.
        self._pending: collections.deque[LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the database (creating the table) and start the writer thread."""
        try:
            self._engine = open_engine(self.url, create=True)
            ensure_schema(self._engine)
        except (SQLAlchemyError, OSError, OpsloopError) as exc:
            raise ConfigError(
                f"cannot open the prediction log {redact_url(self.url)}: {first_line(exc)}; fix "
                "OPSLOOP_PREDLOG_URL (or set it to 'none' to switch the log off)"
            ) from exc
        self._thread = threading.Thread(target=self._write_forever, name="predlog", daemon=True)
        self._thread.start()

    def append(self, record: LogRecord) -> None:
        """Queue one request's predictions; never blocks the caller."""
        self._pending.append(record)

    @property
    def backlog(self) -> int:
        """Records queued but not yet written."""
        return len(self._pending)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer (graceful shutdown)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error(
                "prediction log: %d records still unwritten after %.0fs", self.backlog, timeout
            )
        self._thread = None
        if self._engine is not None:
            self._engine.dispose()

    def _write_forever(self) -> None:
        stopping = False
        while not stopping:
            stopping = self._stop.wait(self.flush_interval_s)
            while self._pending:  # everything queued, in batches of about batch_rows rows
                self._write(self._take(self.batch_rows))

    def _take(self, max_rows: int) -> list[LogRecord]:
        """The oldest queued records, up to about `max_rows` rows (at least one record)."""
        records: list[LogRecord] = []
        rows = 0
        while self._pending and rows < max_rows:
            record = self._pending.popleft()
            records.append(record)
            rows += len(record.inputs)
        return records

    def _write(self, records: Sequence[LogRecord]) -> None:
        """Insert in one transaction, retrying with back-off while the database is unavailable."""
        rows = rows_of(records)
        assert self._engine is not None
        for attempt, pause in enumerate((*RETRY_SECONDS, None)):
            try:
                with self._engine.begin() as connection:
                    insert_rows(connection, rows)
            except SQLAlchemyError as exc:
                self.write_errors += 1
                logger.warning(
                    "prediction log write of %d rows failed (attempt %d): %s",
                    len(rows),
                    attempt + 1,
                    first_line(exc),
                )
                if pause is None:
                    logger.error("prediction log: dropped %d rows after retries", len(rows))
                    return
                time.sleep(pause)
                continue
            self.rows_written += len(rows)
            if self.on_written is not None:
                self.on_written(len(rows))
            return


class NullPredictionLog(PredictionLog):
    """The log switched off (`OPSLOOP_PREDLOG_URL=none`): accepts records and keeps nothing."""

    def __init__(self) -> None:
        super().__init__("sqlite://")

    def start(self) -> None:
        pass

    def append(self, record: LogRecord) -> None:
        pass


@contextlib.contextmanager
def prediction_log(url: str | None, **options: Any) -> Iterator[PredictionLog]:
    """A started log (or the null log when `url` is None) that is flushed and closed on exit."""
    log = NullPredictionLog() if url is None else PredictionLog(url, **options)
    log.start()
    try:
        yield log
    finally:
        log.close()
