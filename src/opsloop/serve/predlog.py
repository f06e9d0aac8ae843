"""The prediction log as a serving process sees it: `append` a record; it reaches SQL later.

`append` writes the record to this process's journal (`opsloop.serve.journal`) before it
returns — before the response is sent — so an acknowledged prediction survives the process
being killed. The ingester (`opsloop.serve.ingest`) moves journal records into the SQL table:
`opsloop serve` runs one ingester process for all its workers; an app started on its own
(`ingest_in_process`, the default here) runs one as a thread, and `close()` (graceful shutdown)
waits until it has written everything. The table and its reader live in `opsloop.predictions`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from opsloop.predictions import EngineOptions
from opsloop.serve.ingest import Housekeeping, Ingester, IngesterThread, Retention
from opsloop.serve.journal import (
    DEFAULT_MAX_BYTES,
    DEFAULT_SEGMENT_BYTES,
    JournalWriter,
    LogRecord,
    RecordBatch,
)

__all__ = ["LogRecord", "NullPredictionLog", "PredictionLog", "RecordBatch", "prediction_log"]

logger = logging.getLogger(__name__)


class PredictionLog:
    """One process's side of the log: a journal writer (and, in process, the ingester)."""

    def __init__(
        self,
        url: str,
        *,
        journal_dir: Path | None = None,
        ingest_in_process: bool = True,
        fsync: bool = False,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_journal_bytes: int = DEFAULT_MAX_BYTES,
        batch_rows: int = 2048,
        flush_interval_s: float = 0.2,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        engine_options: EngineOptions | None = None,
        retention: Retention | None = None,
        on_housekeeping: Callable[[Housekeeping], None] | None = None,
    ) -> None:
        self.url = url
        self._owned_dir = journal_dir is None  # a private temporary journal, removed on close
        self.journal_dir = journal_dir or Path(tempfile.mkdtemp(prefix="opsloop-journal-"))
        self.writer = JournalWriter(
            self.journal_dir,
            fsync=fsync,
            segment_bytes=segment_bytes,
            max_bytes=max_journal_bytes,
            on_dropped=on_dropped,
        )
        self.ingester = Ingester(
            self.journal_dir,
            url,
            batch_rows=batch_rows,
            interval_s=flush_interval_s,
            engine_options=engine_options,
            on_written=on_written,
            retention=retention,
            on_housekeeping=on_housekeeping,
        )
        self._thread = IngesterThread(self.ingester) if ingest_in_process else None

    def start(self) -> None:
        """Open the journal, and the database and ingester thread when ingesting in process."""
        if self._thread is not None:
            self._thread.start()  # opens the database first: a bad URL fails here
        else:
            self.ingester.open()  # checks the URL and creates the tables once
            self.ingester.close()
        self.writer.open()

    def append(self, record: LogRecord) -> None:
        """Write one request's predictions to the journal (a `write(2)`; never waits on SQL)."""
        self.writer.append(record)

    def append_many(self, records: Sequence[LogRecord]) -> None:
        """Write several requests' predictions in one `write(2)`."""
        self.writer.append_many(records)

    def append_batches(self, batches: Sequence[RecordBatch]) -> None:
        """Write batches of requests' predictions in one `write(2)`."""
        self.writer.append_batches(batches)

    def close(self, timeout: float = 30.0) -> None:
        """Seal the journal; in process, write everything to the database before returning."""
        self.writer.close()
        if self._thread is not None:
            self._thread.close(timeout)
            if self._owned_dir and not self.ingester.backlog_bytes():
                shutil.rmtree(self.journal_dir, ignore_errors=True)

    @property
    def rows_written(self) -> int:
        """Rows this process's ingester committed to the database."""
        return self.ingester.stats.rows

    @property
    def rows_dropped(self) -> int:
        """Rows refused because the journal was over its size limit."""
        return self.writer.rows_dropped

    @property
    def backlog_bytes(self) -> int:
        """Journal bytes not yet in the database."""
        return self.ingester.backlog_bytes()


class NullPredictionLog(PredictionLog):
    """The log switched off (`OPSLOOP_PREDLOG_URL=none`): accepts records and keeps nothing."""

    def __init__(self) -> None:
        self.url = "none"

    def start(self) -> None:
        pass

    def append(self, record: LogRecord) -> None:
        pass

    def append_many(self, records: Sequence[LogRecord]) -> None:
        pass

    def append_batches(self, batches: Sequence[RecordBatch]) -> None:
        pass

    def close(self, timeout: float = 30.0) -> None:
        pass

    @property
    def rows_written(self) -> int:
        return 0

    @property
    def rows_dropped(self) -> int:
        return 0

    @property
    def backlog_bytes(self) -> int:
        return 0


@contextlib.contextmanager
def prediction_log(url: str | None, **options: Any) -> Iterator[PredictionLog]:
    """A started log (or the null log when `url` is None) that is written and closed on exit."""
    log = NullPredictionLog() if url is None else PredictionLog(url, **options)
    log.start()
    try:
        yield log
    finally:
        log.close()
