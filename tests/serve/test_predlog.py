"""The prediction log: background batched writes, flushed on close, readable back."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from opsloop.errors import ConfigError
from opsloop.predictions import decode_input, open_engine, read_predictions
from opsloop.serve.predlog import (
    COLUMNS,
    LogRecord,
    NullPredictionLog,
    PredictionLog,
    compact_input,
    prediction_log,
    rows_of,
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


def test_one_row_per_example_with_label_and_confidence() -> None:
    item = record("r1", rows=3)
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in rows_of([item])]
    assert [row["item"] for row in rows] == [0, 1, 2]
    assert all(row["request_id"] == "r1" for row in rows)
    for row, probabilities, inputs in zip(rows, item.probabilities, item.inputs, strict=True):
        assert row["label"] == int(probabilities.argmax())
        assert row["confidence"] == pytest.approx(float(probabilities.max()))
        np.testing.assert_array_equal(
            np.frombuffer(row["probabilities"], dtype=np.float32), probabilities
        )
        assert row["input_shape"] == "[1,8,8]"
        assert row["input_dtype"] == "float32"
        np.testing.assert_array_equal(
            decode_input(row["input"], row["input_dtype"], row["input_shape"]), inputs
        )


def test_rows_keep_record_order_across_shapes() -> None:
    small = [record("a", rows=2), record("b")]
    other = record("c")
    other = dataclasses.replace(other, inputs=np.zeros((1, 1, 4, 4), np.float32))
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in rows_of([*small, other, record("d")])]
    assert [(r["request_id"], r["item"]) for r in rows] == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
        ("c", 0),
        ("d", 0),
    ]
    assert [r["input_shape"] for r in rows] == ["[1,8,8]"] * 3 + ["[1,4,4]", "[1,8,8]"]
    assert rows[3]["input_dtype"] == "uint8"  # all zeros: lossless as uint8


def test_inputs_are_stored_compactly_only_when_lossless() -> None:
    whole = np.array([[0.0, 3.0], [255.0, 16.0]], dtype=np.float32)
    compact, dtype = compact_input(whole)
    assert (dtype, compact.nbytes) == ("uint8", 4)
    np.testing.assert_array_equal(decode_input(compact.tobytes(), dtype, "[2, 2]"), whole)
    fractional = whole + 0.5
    compact, dtype = compact_input(fractional)
    assert (dtype, compact.nbytes) == ("float32", 16)
    np.testing.assert_array_equal(decode_input(compact.tobytes(), dtype, "[2, 2]"), fractional)
    assert compact_input(whole * -1)[1] == "float32"


def test_close_writes_everything_appended(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    log = PredictionLog(url, batch_rows=7, flush_interval_s=10.0)
    written: list[int] = []
    log.on_written = written.append
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
    np.testing.assert_array_equal(logged.embeddings[0], first.embedding[0])
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
    from opsloop.serve import predlog as module

    monkeypatch.setattr(module, "RETRY_SECONDS", (0.01,))
    url = url_for(tmp_path)
    log = PredictionLog(url)
    log.start()
    original = log._engine
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
    assert log.write_errors == 1
    assert log.rows_written == 1


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
        engine = log._engine
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


def test_rows_wait_for_a_database_that_went_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.serve import predlog as module

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
    wait_for(lambda: log.write_errors >= 5)  # retried (with back-off) many times, kept queued
    assert log.rows_written == 1
    outage.down.clear()
    total = 1 + sum(len(r.inputs) for r in during)
    wait_for(lambda: log.rows_written == total)
    log.close()
    assert log.rows_dropped == 0
    logged = read_predictions(url)
    expected = ["before"] + [r.request_id for r in during for _ in range(len(r.inputs))]
    assert logged.request_ids == expected  # every row, in order, once


def test_the_outage_buffer_is_bounded_and_drops_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.serve import predlog as module

    monkeypatch.setattr(module, "RETRY_SECONDS", (0.01,))
    url = url_for(tmp_path)
    dropped: list[int] = []
    log = PredictionLog(url, flush_interval_s=0.01, max_buffered_rows=5, on_dropped=dropped.append)
    log.start()
    outage = Outage(log, monkeypatch)
    outage.down.set()
    records = [record(f"r{i}") for i in range(12)]
    for item in records:
        log.append(item)
    wait_for(lambda: log.rows_dropped == 7)  # the oldest go; the newest 5 wait
    outage.down.clear()
    wait_for(lambda: log.rows_written == 5)
    log.close()
    assert sum(dropped) == log.rows_dropped == 7
    assert read_predictions(url).request_ids == [r.request_id for r in records[7:]]


def test_close_gives_up_on_a_database_that_stays_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.serve import predlog as module

    monkeypatch.setattr(module, "RETRY_SECONDS", (0.05,))
    log = PredictionLog(url_for(tmp_path), flush_interval_s=0.01)
    log.start()
    Outage(log, monkeypatch).down.set()
    log.append(record("lost", rows=3))
    started = time.monotonic()
    log.close(timeout=1.5)  # retries until just before the timeout, then counts the loss
    assert time.monotonic() - started < 3.0
    assert log.rows_dropped == 3
    assert log.rows_written == 0
    assert log.write_errors >= 2


def test_pool_and_timeouts_are_settings() -> None:
    pytest.importorskip("psycopg", reason="the 'postgres' extra provides psycopg")
    from opsloop.serve.settings import load_settings

    settings = load_settings(
        predlog_url="postgresql+psycopg://opsloop:pw@127.0.0.1:1/db",
        predlog_pool_size=3,
        predlog_pool_timeout_s=7,
        predlog_connect_timeout_s=4,
        predlog_max_buffered_rows=50,
    )
    log = PredictionLog(
        settings.resolved_predlog_url(),
        engine_options=settings.predlog_engine_options(),
        max_buffered_rows=settings.predlog_max_buffered_rows,
    )
    engine = open_engine(log.url, create=False, options=log.engine_options)
    try:
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.pool.timeout() == 7  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert log.max_buffered_rows == 50
    with pytest.raises(ConfigError, match=r"OPSLOOP_PREDLOG_POOL_SIZE=0 is invalid.*connections"):
        load_settings(predlog_pool_size=0)
