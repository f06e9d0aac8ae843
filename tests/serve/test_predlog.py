"""The prediction log as a process sees it: journaled on append, in SQL after close, readable."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from opsloop.errors import ConfigError
from opsloop.predictions import open_engine, read_predictions
from opsloop.serve.predlog import (
    LogRecord,
    NullPredictionLog,
    PredictionLog,
    prediction_log,
)


def record(request_id: str, rows: int = 1, *, scale: float = 16.0, version: str = "1") -> LogRecord:
    rng = np.random.default_rng(abs(hash(request_id)) % 2**32)
    probabilities = rng.dirichlet(np.ones(10), size=rows).astype(np.float32)
    return LogRecord(
        request_id=request_id,
        created_at=time.time(),
        endpoint="infer",
        model_name="digits",
        model_version=version,
        inputs=(rng.random((rows, 1, 8, 8)) * scale).astype(np.float32),
        probabilities=probabilities,
        embedding=rng.random((rows, 16)).astype(np.float32),
        latency_ms=1.5,
    )


def url_for(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'logs' / 'predictions.db'}"


def test_close_writes_everything_appended(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    written: list[int] = []
    log = PredictionLog(url, batch_rows=7, flush_interval_s=10.0, on_written=written.append)
    log.start()
    records = [record(f"r{i}", rows=1 + i % 3) for i in range(50)]
    for item in records:
        log.append(item)
    log.close()  # long flush interval: only close's flush can have written the tail
    logged = read_predictions(url)
    expected_rows = sum(len(r.inputs) for r in records)
    assert len(logged) == expected_rows == log.rows_written == sum(written)
    first = records[0]
    assert logged.request_ids[0] == first.request_id
    np.testing.assert_allclose(logged.inputs[0], first.inputs[0], rtol=1e-6)
    np.testing.assert_array_equal(logged.probabilities[0], first.probabilities[0])
    half = {"rtol": 1e-3, "atol": 1e-4}  # embeddings are kept in half precision
    np.testing.assert_allclose(logged.embeddings[0], first.embedding[0], **half)
    assert logged.model_versions[0] == "1"
    assert logged.endpoints[0] == "infer"


def test_rows_are_written_in_the_background_while_running(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    log = PredictionLog(url, flush_interval_s=0.05)
    log.start()
    log.append(record("early"))
    deadline = time.monotonic() + 10
    while log.rows_written < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_predictions(url).request_ids == ["early"]
    log.close()


def test_sqlite_runs_in_wal_mode_and_survives_a_restart(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    with prediction_log(url) as log:
        log.append(record("first"))
    with prediction_log(url) as log:
        log.append(record("second", version="2"))
    logged = read_predictions(url)
    assert logged.request_ids == ["first", "second"]
    assert logged.model_versions == ["1", "2"]
    with sqlite3.connect(tmp_path / "logs" / "predictions.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_read_back_the_latest_or_since(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    with prediction_log(url) as log:
        for i in range(5):
            log.append(record(f"r{i}"))
    assert read_predictions(url, limit=2).request_ids == ["r3", "r4"]
    assert len(read_predictions(url, since=time.time() + 60)) == 0


def test_an_unusable_database_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot open the prediction log"):
        PredictionLog(f"sqlite:///{blocker / 'sub' / 'p.db'}").start()


def test_a_failing_write_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opsloop.serve import ingest as module

    monkeypatch.setattr(module, "RETRY_SECONDS", (0.01,))
    url = url_for(tmp_path)
    log = PredictionLog(url, flush_interval_s=0.01)
    log.start()
    original = log.ingester._engine
    assert original is not None
    calls = {"n": 0}
    real_begin = original.begin

    def flaky_begin() -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return real_begin()

    monkeypatch.setattr(original, "begin", flaky_begin)
    log.append(record("retried"))
    log.close()
    assert calls["n"] >= 2
    assert log.rows_written == 1
    assert read_predictions(url).request_ids == ["retried"]


def test_the_null_log_keeps_nothing() -> None:
    log = NullPredictionLog()
    log.start()
    log.append(record("nothing"))
    log.close()
    assert log.rows_written == 0


class Outage:
    """Makes a log's engine refuse every transaction while `down` is set, as a stopped server."""

    def __init__(self, log: PredictionLog, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = threading.Event()
        engine = log.ingester._engine
        assert engine is not None
        real_begin = engine.begin

        def begin() -> object:
            if self.down.is_set():
                raise OperationalError("INSERT", {}, Exception("connection refused"))
            return real_begin()

        monkeypatch.setattr(engine, "begin", begin)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_rows_wait_on_disk_for_a_database_that_went_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.serve import ingest as module

    monkeypatch.setattr(module, "RETRY_SECONDS", (0.01, 0.02))
    url = url_for(tmp_path)
    log = PredictionLog(url, flush_interval_s=0.01, batch_rows=4)
    log.start()
    outage = Outage(log, monkeypatch)
    log.append(record("before"))
    wait_for(lambda: log.rows_written == 1)
    outage.down.set()
    during = [record(f"during{i}", rows=1 + i % 3) for i in range(10)]
    for item in during:
        log.append(item)
    time.sleep(0.2)  # many retries with back-off meanwhile
    assert log.rows_written == 1
    assert log.backlog_bytes > 0  # waiting in the journal, not in memory
    outage.down.clear()
    total = 1 + sum(len(r.inputs) for r in during)
    wait_for(lambda: log.rows_written == total)
    log.close()
    assert log.rows_dropped == 0
    logged = read_predictions(url)
    expected = ["before"] + [r.request_id for r in during for _ in range(len(r.inputs))]
    assert logged.request_ids == expected  # every row, in order, once


def test_a_full_journal_drops_new_rows_and_counts_them(tmp_path: Path) -> None:
    dropped: list[int] = []
    log = PredictionLog(
        url_for(tmp_path),
        journal_dir=tmp_path / "journal",
        ingest_in_process=False,  # nobody empties the journal
        segment_bytes=4096,
        max_journal_bytes=8192,
        on_dropped=dropped.append,
    )
    log.start()
    records = [record(f"r{i}", rows=2) for i in range(40)]
    accepted = [log.writer.append(item) for item in records]
    log.close()
    assert not all(accepted)
    assert accepted[0]  # the first ones fit
    assert sum(dropped) == log.rows_dropped == 2 * accepted.count(False)
    journal = tmp_path / "journal"
    assert sum(p.stat().st_size for p in journal.glob("*.journal")) < 8192 + 4096 + 2048


def test_close_keeps_what_a_database_that_stays_away_did_not_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.serve import ingest as module

    monkeypatch.setattr(module, "RETRY_SECONDS", (0.05,))
    url = url_for(tmp_path)
    journal = tmp_path / "journal"
    log = PredictionLog(url, journal_dir=journal, flush_interval_s=0.01)
    log.start()
    Outage(log, monkeypatch).down.set()
    log.append(record("kept", rows=3))
    started = time.monotonic()
    log.close(timeout=1.0)  # gives up writing after the timeout; the journal keeps the rows
    assert time.monotonic() - started < 10.0
    assert log.rows_written == 0
    assert log.rows_dropped == 0
    monkeypatch.undo()
    with prediction_log(url, journal_dir=journal):  # the next start writes them
        pass
    assert read_predictions(url).request_ids == ["kept"] * 3


def test_pool_and_timeouts_are_settings() -> None:
    pytest.importorskip("psycopg", reason="the 'postgres' extra provides psycopg")
    from opsloop.serve.settings import load_settings

    settings = load_settings(
        predlog_url="postgresql+psycopg://opsloop:pw@127.0.0.1:1/db",
        predlog_pool_size=3,
        predlog_pool_timeout_s=7,
        predlog_connect_timeout_s=4,
        journal_max_bytes=50 * 1024 * 1024,
    )
    log = PredictionLog(
        settings.resolved_predlog_url(),
        engine_options=settings.predlog_engine_options(),
        max_journal_bytes=settings.journal_max_bytes,
    )
    engine = open_engine(log.url, create=False, options=log.ingester.engine_options)
    try:
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.pool.timeout() == 7  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert log.writer.max_bytes == 50 * 1024 * 1024
    with pytest.raises(ConfigError, match=r"OPSLOOP_PREDLOG_POOL_SIZE=0 is invalid.*connections"):
        load_settings(predlog_pool_size=0)
