"""The ingester: moves journal records into the SQL prediction log, exactly once.

Workers only append to their journals (`opsloop.serve.journal`); this moves the records, in
batches, into the `predictions` table, and deletes each segment once all of it is committed and
its writer is gone. Each batch's rows and the segment's new offset are committed in one
transaction (`journal_offsets`), so an ingester killed at any point resumes exactly where the
database says it stopped: nothing is lost and nothing is logged twice. One ingester runs per
journal directory (an exclusive `flock` on `ingester.lock`); `opsloop serve` runs it as its own
process and restarts it if it dies, an app started without that supervisor runs it as a thread.
While the database refuses writes, records wait on disk, not in memory, retried with back-off.

Why one file of ~550 lines: exactly-once rests on reading frames, the batched insert, the
offsets and retention sharing one transaction design; it is kept whole so it is read whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from opsloop.errors import ConfigError, OpsloopError, first_line, redact_url
from opsloop.predictions import (
    EngineOptions,
    ensure_schema,
    feedback,
    items,
    journal_offsets,
    open_engine,
    requests,
    take_ids,
)
from opsloop.serve.journal import (
    RecordBatch,
    consecutive_runs,
    decode_frames,
    frame_size,
    is_sealed,
    list_segments,
)

logger = logging.getLogger(__name__)

LOCK_FILE = "ingester.lock"
# How often retention runs and the log's size is measured.
HOUSEKEEPING_S = 60.0
# Read a segment this much at a time: a backlog never needs more memory than this.
READ_BYTES = 4 * 1024 * 1024
# Pauses between attempts while the database refuses writes; the last one repeats.
RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)


Row = tuple[Any, ...]
REQUEST_COLUMNS = tuple(column.name for column in requests.columns)
ITEM_COLUMNS = tuple(column.name for column in items.columns)
# Probabilities keep single precision: a confident model's answers crowd just below 1, where half
# precision rounds them all to exactly 1 and the drift tests would see a shift that is not there.
# Embedding coordinates (spread over several units) lose nothing that matters in half precision.
PROBABILITIES_DTYPE = "<f4"
EMBEDDING_DTYPE = "<f2"
# Rows per multi-row INSERT: 256 x 12 parameters stays far below SQLite's limit of 32766.
MULTIROW_CHUNK = 256


@dataclass(frozen=True)
class Rows:
    """The table rows of some records: one per request, one per example."""

    requests: list[Row]  # in REQUEST_COLUMNS order
    items: list[Row]  # in ITEM_COLUMNS order


def rows_of(batches: Sequence[RecordBatch], first_id: int) -> Rows:
    """The rows of many batches, requests numbered from `first_id` in order.

    Consecutive batches of one shape are joined and turned into rows column by column: the
    arrays are converted once and sliced from one buffer each, and the rows are zipped in C.
    """
    rows = Rows([], [])
    for run in consecutive_runs(batches, RecordBatch.shape_key):
        _add_batch(rows, RecordBatch.joined(run), first_id + len(rows.requests))
    return rows


def _add_batch(rows: Rows, batch: RecordBatch, first_id: int) -> None:
    examples = len(batch.inputs)
    compact, dtype = compact_input(batch.inputs)
    ids = np.arange(first_id, first_id + len(batch), dtype=np.int64)
    rows.requests.extend(
        zip(
            ids.tolist(),
            batch.request_ids,
            batch.created_at,
            batch.endpoints,
            batch.model_names,
            batch.model_versions,
            batch.roles,
            batch.latency_ms,
            batch.sample_rates,
            itertools.repeat(dtype),
            itertools.repeat(orjson.dumps(batch.inputs.shape[1:]).decode()),
            itertools.repeat(EMBEDDING_DTYPE),
            strict=False,  # the repeats are endless: the lists set the length
        )
    )
    counts = np.asarray(batch.rows, dtype=np.int64)
    first_rows = np.cumsum(counts) - counts  # where each request's examples start
    rows.items.extend(
        zip(
            np.repeat(ids, counts).tolist(),  # each example's request
            (np.arange(examples) - np.repeat(first_rows, counts)).tolist(),  # its place in it
            _row_slices(compact, examples),
            _row_slices(np.ascontiguousarray(batch.probabilities, PROBABILITIES_DTYPE), examples),
            _row_slices(np.ascontiguousarray(batch.embedding, EMBEDDING_DTYPE), examples),
            batch.probabilities.argmax(axis=1).tolist(),
            strict=True,
        )
    )


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


def insert_rows(connection: Connection, batches: Sequence[RecordBatch]) -> int:
    """Insert the batches' rows (taking their request ids); the number of examples."""
    rows = rows_of(batches, take_ids(connection, sum(map(len, batches))))
    insert_many(connection, requests, REQUEST_COLUMNS, rows.requests)
    insert_many(connection, items, ITEM_COLUMNS, rows.items)
    return len(rows.items)


def insert_many(
    connection: Connection, table: Table, columns: Sequence[str], rows: Sequence[Row]
) -> None:
    """Insert straight through the DB driver, bypassing SQLAlchemy's per-row processing.

    The values are plain str/int/float/bytes that every driver takes as they are. With a
    positional parameter style (SQLite's `?`, psycopg's `%s`), rows go in multi-row INSERTs:
    one statement per chunk instead of one per row.
    """
    marker = {"qmark": "?", "format": "%s"}.get(connection.dialect.paramstyle)
    if marker is None:
        statement = insert(table).values({name: bindparam(name) for name in columns})
        sql = str(statement.compile(dialect=connection.dialect))
        connection.exec_driver_sql(sql, [dict(zip(columns, row, strict=True)) for row in rows])
        return
    head = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
    group = "(" + ", ".join([marker] * len(columns)) + ")"
    for start in range(0, len(rows), MULTIROW_CHUNK):
        chunk = rows[start : start + MULTIROW_CHUNK]
        values = tuple(itertools.chain.from_iterable(chunk))
        connection.exec_driver_sql(head + ", ".join([group] * len(chunk)), values)


@dataclass(frozen=True)
class Retention:
    """How much of the log to keep: rows younger than `max_age_s`, the newest `max_rows`."""

    max_age_s: float | None = None
    max_rows: int | None = None

    def apply(self, connection: Connection) -> int:
        """Delete what the rules let go, whole requests at a time; the examples deleted."""
        deleted = 0
        if self.max_age_s is not None:
            cutoff = time.time() - self.max_age_s
            old = select(requests.c.id).where(requests.c.created_at < cutoff)
            deleted += delete_requests(connection, requests.c.id.in_(old))
            connection.execute(delete(feedback).where(feedback.c.created_at < cutoff))
        if self.max_rows is not None:
            # The request of the newest example beyond the limit: it and older ones go.
            beyond = connection.execute(
                select(items.c.request)
                .order_by(items.c.request.desc(), items.c.item.desc())
                .limit(1)
                .offset(self.max_rows)
            ).scalar()
            if beyond is not None:
                deleted += delete_requests(connection, requests.c.id <= beyond)
        return deleted


def delete_requests(connection: Connection, where: Any) -> int:
    """Delete the requests matching `where` (a condition on `requests`) and their examples."""
    chosen = select(requests.c.id).where(where)
    result = connection.execute(delete(items).where(items.c.request.in_(chosen)))
    connection.execute(delete(requests).where(where))
    return int(result.rowcount or 0)


@dataclass(frozen=True)
class Housekeeping:
    """One round of housekeeping: what retention deleted, and how big the log is now."""

    deleted_rows: int
    rows: int
    bytes: int
    backlog_bytes: int


def log_size(engine: Engine) -> tuple[int, int]:
    """(examples, bytes) of the log's tables: SQLite's file (with its WAL), or PostgreSQL's
    tables with their indexes and TOAST."""
    with engine.connect() as connection:
        rows = int(connection.execute(select(func.count()).select_from(items)).scalar_one())
        if engine.dialect.name == "sqlite":
            database = engine.url.database
            if database and database != ":memory:":  # on disk: the file and its WAL
                files = (Path(database), Path(f"{database}-wal"))
                return rows, sum(path.stat().st_size for path in files if path.exists())
            pages = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
            page_size = connection.exec_driver_sql("PRAGMA page_size").scalar_one()
            return rows, int(pages) * int(page_size)
        if engine.dialect.name == "postgresql":
            tables = [requests.name, items.name, feedback.name]
            total = connection.execute(
                text("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(:t) AS t"),
                {"t": tables},
            ).scalar()
            return rows, int(total or 0)
    return rows, 0


@dataclass
class IngestStats:
    """What this ingester has done since it started."""

    rows: int = 0
    segments_deleted: int = 0
    torn_bytes: int = 0  # bytes of unacknowledged (torn) or corrupt frames skipped


class Ingester:
    """Journal directory -> SQL log, one pass at a time (`ingest_once`) or until stopped."""

    def __init__(
        self,
        directory: Path,
        url: str,
        *,
        batch_rows: int = 2048,
        interval_s: float = 0.2,
        engine_options: EngineOptions | None = None,
        on_written: Callable[[int], None] | None = None,
        retention: Retention | None = None,
        on_housekeeping: Callable[[Housekeeping], None] | None = None,
    ) -> None:
        self.directory = directory
        self.url = url
        self.batch_rows = batch_rows
        self.interval_s = interval_s
        self.engine_options = engine_options
        self.on_written = on_written
        self.retention = retention or Retention()
        self.on_housekeeping = on_housekeeping
        self.stats = IngestStats()
        self._next_housekeeping = 0.0
        self._engine: Engine | None = None
        self._offsets: dict[str, int] | None = None  # segment name -> committed offset
        self._failures = 0

    def open(self) -> None:
        """Open the database (creating the tables), a ConfigError naming the URL otherwise."""
        try:
            self._engine = open_engine(self.url, create=True, options=self.engine_options)
            ensure_schema(self._engine)
        except (SQLAlchemyError, OSError, OpsloopError) as exc:
            raise ConfigError(
                f"cannot open the prediction log {redact_url(self.url)}: {first_line(exc)}; fix "
                "OPSLOOP_PREDLOG_URL (or set it to 'none' to switch the log off)"
            ) from exc

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def ingest_once(self) -> int:
        """Commit every whole record now in the journal; the rows committed (0 on a DB error)."""
        try:
            return sum(self._ingest_segment(path) for path in list_segments(self.directory))
        except SQLAlchemyError as exc:
            self._failures += 1
            self._offsets = None  # re-read: a failed transaction may have been rolled back
            logger.warning(
                "prediction log: writing the journal to the database failed (attempt %d): %s",
                self._failures,
                first_line(exc),
            )
            return 0

    @property
    def pause(self) -> float:
        """How long to wait before the next pass: the interval, or the current back-off."""
        if self._failures == 0:
            return self.interval_s
        return RETRY_SECONDS[min(self._failures, len(RETRY_SECONDS)) - 1]

    def backlog_bytes(self) -> int:
        """Journal bytes not yet committed to the database."""
        offsets = self._offsets or {}
        total = 0
        for path in list_segments(self.directory):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size - offsets.get(path.name, 0)
        return total

    def run(
        self, stop: threading.Event, drain_timeout_s: float | Callable[[], float] = 30.0
    ) -> None:
        """Ingest until `stop` is set, then once more until the journal is empty (or the
        database has refused writes for `drain_timeout_s`: the rest stays on disk for later)."""
        while not stop.is_set():
            self.ingest_once()
            self.housekeep()
            stop.wait(self.pause)
        # Read only now: whoever stops the ingester may say at the same time how long to drain.
        timeout = drain_timeout_s() if callable(drain_timeout_s) else drain_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            self.ingest_once()
            if self._failures == 0 and not self._has_sealed_backlog():
                return
            if time.monotonic() >= deadline:
                logger.error(
                    "prediction log: %d journal bytes not yet in the database; they stay in %s "
                    "and are written when the ingester next runs",
                    self.backlog_bytes(),
                    self.directory,
                )
                return
            time.sleep(self.pause)

    def housekeep(self, *, now: bool = False) -> Housekeeping | None:
        """Every `HOUSEKEEPING_S` (or `now`): apply the retention rules, measure the log."""
        if not now and time.monotonic() < self._next_housekeeping:
            return None
        self._next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        assert self._engine is not None
        try:
            with self._engine.begin() as connection:
                deleted = self.retention.apply(connection)
            rows, size = log_size(self._engine)
        except SQLAlchemyError as exc:
            logger.warning("prediction log housekeeping failed: %s", first_line(exc))
            return None
        done = Housekeeping(deleted, rows, size, self.backlog_bytes())
        if deleted:
            logger.info("prediction log retention: deleted %d examples", deleted)
        if self.on_housekeeping is not None:
            self.on_housekeeping(done)
        return done

    def _has_sealed_backlog(self) -> bool:
        """Records left that no live writer is still adding to (those a later pass takes)."""
        return any(is_sealed(path) for path in list_segments(self.directory))

    def _ingest_segment(self, path: Path) -> int:
        sealed = is_sealed(path)  # checked first: a sealed segment can no longer grow
        offsets = self._load_offsets()
        offset = offsets.get(path.name, 0)
        committed = 0
        try:
            size = path.stat().st_size
            with path.open("rb") as file:
                while offset < size:
                    taken, rows = self._commit_read(path.name, read_frames_at(file, offset), offset)
                    committed += rows
                    if taken == 0:
                        break  # a torn or corrupt tail, or a frame still being written
                    offset += taken
        except FileNotFoundError:  # another ingester (an earlier life of this one) deleted it
            return committed
        if sealed:
            self._retire(path, offset, size)
        return committed

    def _commit_read(self, segment: str, data: memoryview, base: int) -> tuple[int, int]:
        """Commit the whole frames in `data` (read at segment offset `base`), up to
        `batch_rows` requests per transaction (a frame is never split); (bytes, rows) committed."""
        position = rows = 0
        while True:
            frames = decode_frames(data[position:], base + position, self.batch_rows)
            if frames.batches:
                rows += self._commit(segment, frames.batches, frames.end)
                position = frames.end - base
            if frames.corrupt or not frames.batches:
                return position, rows

    def _commit(self, segment: str, batches: list[RecordBatch], end: int) -> int:
        """Insert the batches' rows and move the segment's offset, in one transaction."""
        assert self._engine is not None
        assert self._offsets is not None
        with self._engine.begin() as connection:
            count = insert_rows(connection, batches)
            save_offset(connection, segment, end, known=segment in self._offsets)
        self._offsets[segment] = end
        if self._failures:
            logger.info("prediction log: the database takes writes again")
        self._failures = 0
        self.stats.rows += count
        if self.on_written is not None:
            self.on_written(count)
        return count

    def _retire(self, path: Path, offset: int, size: int) -> None:
        """Delete a sealed segment committed up to its end (skipping a torn or corrupt tail)."""
        assert self._engine is not None
        assert self._offsets is not None
        if offset < size:
            # Sealed, so its writer is gone: what no whole frame covers was never acknowledged
            # (killed inside `write`) or is damaged. Either way it cannot be read; say so.
            logger.warning(
                "prediction journal %s: skipped %d bytes of a torn or damaged tail",
                path.name,
                size - offset,
            )
            self.stats.torn_bytes += size - offset
        path.unlink(missing_ok=True)
        with self._engine.begin() as connection:
            statement = delete(journal_offsets).where(journal_offsets.c.segment == path.name)
            connection.execute(statement)
        self._offsets.pop(path.name, None)
        self.stats.segments_deleted += 1

    def _load_offsets(self) -> dict[str, int]:
        if self._offsets is None:
            assert self._engine is not None
            with self._engine.connect() as connection:
                rows = connection.execute(select(journal_offsets)).all()
            self._offsets = {row.segment: row.committed for row in rows}
        return self._offsets


def read_frames_at(file: BinaryIO, offset: int) -> memoryview:
    """Up to `READ_BYTES` from `offset`, or more when the first frame there is longer: a frame
    is only ever decoded whole."""
    file.seek(offset)
    data = file.read(READ_BYTES)
    needed = frame_size(data)
    if needed > len(data) == READ_BYTES:
        file.seek(offset)
        data = file.read(needed)
    return memoryview(data)


def save_offset(connection: Connection, segment: str, offset: int, *, known: bool) -> None:
    """Record how far `segment` is committed (an update, or the first insert for it)."""
    values = {"committed": offset, "updated_at": time.time()}
    if known:
        statement = (
            update(journal_offsets).where(journal_offsets.c.segment == segment).values(**values)
        )
        if connection.execute(statement).rowcount == 1:
            return
    connection.execute(insert(journal_offsets).values(segment=segment, **values))


@contextlib.contextmanager
def ingester_lock(directory: Path, stop: threading.Event | None = None) -> Iterator[bool]:
    """Hold the directory's one-ingester lock, waiting while another ingester has it.

    Yields False if `stop` was set before the lock could be had. The lock is a `flock`, so an
    ingester that was killed releases it with its last file descriptor.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.warning("another ingester holds %s; waiting for it", directory)
                    waited = True
                if stop is not None and stop.wait(0.2):
                    yield False
                    return
                if stop is None:
                    time.sleep(0.2)
        yield True
    finally:
        os.close(fd)


class IngesterThread:
    """The ingester as a thread of the serving process (when no supervisor runs one)."""

    def __init__(self, ingester: Ingester) -> None:
        self.ingester = ingester
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drain_timeout_s = 30.0

    def start(self) -> None:
        self.ingester.open()
        self._thread = threading.Thread(target=self._main, name="ingester", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Ingest everything left (the caller has sealed its journal first), then stop."""
        if self._thread is None:
            return
        self._drain_timeout_s = timeout
        self._stop.set()
        self._thread.join(timeout + 10)
        if self._thread.is_alive():  # stuck in the database driver: leave it the engine
            logger.error("the ingester thread did not stop in %.0f s", timeout + 10)
            return
        self._thread = None
        self.ingester.close()

    def _main(self) -> None:
        with ingester_lock(self.ingester.directory, self._stop) as held:
            if held:
                self.ingester.run(self._stop, lambda: self._drain_timeout_s)
