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
from opsloop.predictions import (
    CHAMPION_ROLE,
    EngineOptions,
    ensure_schema,
    open_engine,
    predictions,
)

logger = logging.getLogger(__name__)

# Pauses between attempts while the database refuses writes; the last one repeats until it is
# back (rows wait in memory meanwhile, at most `max_buffered_rows` of them).
RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)
DEFAULT_MAX_BUFFERED_ROWS = 100_000


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
    role: str = CHAMPION_ROLE  # champion, canary (answered by the challenger) or shadow


# The columns every row fills, in the order `rows_of` produces them (all but the `id` key).
COLUMNS = tuple(column.name for column in predictions.columns if column.name != "id")
Row = tuple[Any, ...]
# Rows per multi-row INSERT: 256 x 15 parameters stays far below SQLite's limit of 32766.
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
                    record.role,
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
        max_buffered_rows: int = DEFAULT_MAX_BUFFERED_ROWS,
        on_dropped: Callable[[int], None] | None = None,
        engine_options: EngineOptions | None = None,
    ) -> None:
        self.url = url
        self.on_written = on_written
        self.on_dropped = on_dropped
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.max_buffered_rows = max_buffered_rows
        self.engine_options = engine_options
        self.rows_written = 0
        self.rows_dropped = 0
        self.write_errors = 0
        # The rows of the batch being written: kept, in order, until the database takes them.
        self._unwritten: list[Row] = []
        self._failures = 0  # consecutive failed attempts; 0 while the database takes writes
        self._give_up_at = float("inf")  # set by close(): when to stop retrying and drop the rest
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
            self._engine = open_engine(self.url, create=True, options=self.engine_options)
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
        # While the database is down, retry until shortly before `timeout`, then count the
        # rest as dropped, so the join below sees the thread finish.
        self._give_up_at = time.monotonic() + max(0.0, timeout - 1.0)
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
            stopping = self._stop.wait(self._pause())
            self._drain()
        # Shutting down: keep trying while the database is away, until close()'s deadline.
        while self._has_backlog() and time.monotonic() < self._give_up_at:
            time.sleep(min(self._pause(), max(0.0, self._give_up_at - time.monotonic())))
            self._drain()
        if self._has_backlog():
            rows = self._buffered_rows()
            self._unwritten = []
            self._pending.clear()
            self._drop(rows, "the log was closed while the database was away")

    def _pause(self) -> float:
        """The flush interval, or the back-off of the current run of failures."""
        if self._failures == 0:
            return self.flush_interval_s
        return RETRY_SECONDS[min(self._failures, len(RETRY_SECONDS)) - 1]

    def _has_backlog(self) -> bool:
        return bool(self._unwritten or self._pending)

    def _drain(self) -> None:
        """Write everything queued, batch by batch; on a failure keep it and back off."""
        while self._has_backlog():
            if not self._unwritten:
                self._unwritten = rows_of(self._take(self.batch_rows))
            if not self._write(self._unwritten):
                self._enforce_bound()
                return
            self._unwritten = []

    def _take(self, max_rows: int) -> list[LogRecord]:
        """The oldest queued records, up to about `max_rows` rows (at least one record)."""
        records: list[LogRecord] = []
        rows = 0
        while self._pending and rows < max_rows:
            record = self._pending.popleft()
            records.append(record)
            rows += len(record.inputs)
        return records

    def _write(self, rows: Sequence[Row]) -> bool:
        """Insert in one transaction; False (and the error logged) when the database refused."""
        assert self._engine is not None
        try:
            with self._engine.begin() as connection:
                insert_rows(connection, rows)
        except SQLAlchemyError as exc:
            self.write_errors += 1
            self._failures += 1
            logger.warning(
                "prediction log write of %d rows failed (attempt %d, %d rows waiting): %s",
                len(rows),
                self._failures,
                self._buffered_rows(),
                first_line(exc),
            )
            return False
        if self._failures:
            logger.info("prediction log: the database takes writes again")
        self._failures = 0
        self.rows_written += len(rows)
        if self.on_written is not None:
            self.on_written(len(rows))
        return True

    def _buffered_rows(self) -> int:
        # Reads a deque another thread appends to: iterating a snapshot (list) is safe.
        return len(self._unwritten) + sum(len(record.inputs) for record in list(self._pending))

    def _enforce_bound(self) -> None:
        """Drop the oldest rows beyond `max_buffered_rows`: memory stays bounded in an outage.

        The oldest go first because the monitor and the loop judge recent traffic.
        """
        excess = self._buffered_rows() - self.max_buffered_rows
        if excess <= 0:
            return
        dropped = min(excess, len(self._unwritten))
        del self._unwritten[:dropped]
        while dropped < excess and self._pending:
            dropped += len(self._pending.popleft().inputs)
        self._drop(dropped, f"more than {self.max_buffered_rows} rows waited for the database")

    def _drop(self, rows: int, why: str) -> None:
        """Count (and report) rows given up on; the caller has removed them."""
        if rows == 0:
            return
        self.rows_dropped += rows
        if self.on_dropped is not None:
            self.on_dropped(rows)
        logger.error(
            "prediction log: dropped %d rows (%d in all): %s", rows, self.rows_dropped, why
        )


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
