"""The ingester: journal records into SQL rows, exactly once, across crashes and outages."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from opsloop.predictions import decode_input, read_predictions
from opsloop.serve import ingest
from opsloop.serve.ingest import (
    ITEM_COLUMNS,
    REQUEST_COLUMNS,
    RETRY_SECONDS,
    Ingester,
    compact_input,
    ingester_lock,
    rows_of,
)
from opsloop.serve.journal import JournalWriter, batches_of, list_segments
from tests.serve.test_predlog import record, url_for


def test_one_request_row_and_one_item_row_per_example() -> None:
    item = record("r1", rows=3)
    rows = rows_of(batches_of([item]), first_id=41)
    (request,) = [dict(zip(REQUEST_COLUMNS, row, strict=True)) for row in rows.requests]
    assert request["id"] == 41
    assert request["request_id"] == "r1"  # once for the request, not per example
    assert (request["input_shape"], request["input_dtype"]) == ("[1,8,8]", "float32")
    assert request["embedding_dtype"] == "<f2"
    assert request["sample_rate"] == 1.0
    examples = [dict(zip(ITEM_COLUMNS, row, strict=True)) for row in rows.items]
    assert [(row["request"], row["item"]) for row in examples] == [(41, 0), (41, 1), (41, 2)]
    for row, probabilities, inputs in zip(examples, item.probabilities, item.inputs, strict=True):
        assert row["label"] == int(probabilities.argmax())
        stored = np.frombuffer(row["probabilities"], dtype="<f4")
        np.testing.assert_array_equal(stored, probabilities)  # exactly: drift tests read them
        np.testing.assert_array_equal(
            decode_input(row["input"], request["input_dtype"], request["input_shape"]), inputs
        )


def test_rows_keep_record_order_across_shapes() -> None:
    small = [record("a", rows=2), record("b")]
    other = record("c")
    other = dataclasses.replace(other, inputs=np.zeros((1, 1, 4, 4), np.float32))
    rows = rows_of(batches_of([*small, other, record("d")]), first_id=1)
    requests = [dict(zip(REQUEST_COLUMNS, row, strict=True)) for row in rows.requests]
    assert [(r["id"], r["request_id"]) for r in requests] == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
        (4, "d"),
    ]
    assert [(row[0], row[1]) for row in rows.items] == [(1, 0), (1, 1), (2, 0), (3, 0), (4, 0)]
    assert [r["input_shape"] for r in requests] == ["[1,8,8]"] * 2 + ["[1,4,4]", "[1,8,8]"]
    assert requests[2]["input_dtype"] == "uint8"  # all zeros: lossless as uint8


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


def journal_of(directory: Path, count: int, prefix: str = "r") -> list[str]:
    """Write `count` one-row records with a closed (sealed) writer; their ids."""
    writer = JournalWriter(directory, segment_bytes=4096)
    writer.open()
    ids = [f"{prefix}{i}" for i in range(count)]
    for request_id in ids:
        writer.append(record(request_id))
    writer.close()
    return ids


def ingester(tmp_path: Path, **options: int) -> Ingester:
    made = Ingester(tmp_path / "journal", url_for(tmp_path), **options)  # type: ignore[arg-type]
    made.open()
    return made


def test_everything_is_ingested_once_and_sealed_segments_deleted(tmp_path: Path) -> None:
    ids = journal_of(tmp_path / "journal", 40)
    assert len(list_segments(tmp_path / "journal")) > 1
    first = ingester(tmp_path, batch_rows=7)
    assert first.ingest_once() == 40
    assert first.ingest_once() == 0  # nothing twice
    assert list_segments(tmp_path / "journal") == []
    assert first.stats.segments_deleted > 1
    assert read_predictions(url_for(tmp_path)).request_ids == ids


def test_frames_longer_than_one_read_are_ingested_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "READ_BYTES", 1500)  # a frame of 8 records takes ~3 KB
    writer = JournalWriter(tmp_path / "journal")
    writer.open()
    ids = [f"r{i}" for i in range(40)]
    for start in range(0, 40, 8):  # five micro-batches: five frames
        assert writer.append_many([record(request_id) for request_id in ids[start : start + 8]])
    writer.close()
    assert ingester(tmp_path, batch_rows=3).ingest_once() == 40
    assert read_predictions(url_for(tmp_path)).request_ids == ids
    assert list_segments(tmp_path / "journal") == []


def test_one_read_is_committed_in_transactions_of_batch_rows(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "journal")
    writer.open()
    ids = [f"r{i}" for i in range(20)]
    for request_id in ids:  # one-record frames in one segment, all in one read
        writer.append(record(request_id))
    writer.close()
    made = ingester(tmp_path, batch_rows=6)
    commits: list[int] = []
    made.on_written = commits.append
    assert made.ingest_once() == 20
    assert commits == [6, 6, 6, 2]
    assert read_predictions(url_for(tmp_path)).request_ids == ids


def test_a_crash_after_a_commit_resumes_at_the_committed_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = journal_of(tmp_path / "journal", 30)
    crashing = ingester(tmp_path, batch_rows=4)
    engine = crashing._engine
    assert engine is not None
    real_begin = engine.begin
    calls = {"n": 0}

    def begin_then_die() -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # two batches committed, then the "process" dies
            raise OperationalError("INSERT", {}, Exception("killed"))
        return real_begin()

    monkeypatch.setattr(engine, "begin", begin_then_die)
    assert crashing.ingest_once() == 0  # the pass failed part-way (its first 8 rows are in)
    assert len(read_predictions(url_for(tmp_path))) == 8
    # A new ingester, as after a restart: it knows only what the database says.
    assert ingester(tmp_path, batch_rows=4).ingest_once() == 22
    assert read_predictions(url_for(tmp_path)).request_ids == ids  # each once, in order


def test_a_live_writers_segment_is_read_but_kept(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "journal")
    writer.open()
    writer.append(record("live-1"))
    live = ingester(tmp_path)
    assert live.ingest_once() == 1
    assert len(list_segments(tmp_path / "journal")) == 1  # still being written to
    writer.append(record("live-2"))
    assert live.ingest_once() == 1  # only the new record
    writer.close()
    assert live.ingest_once() == 0
    assert list_segments(tmp_path / "journal") == []
    assert read_predictions(url_for(tmp_path)).request_ids == ["live-1", "live-2"]


def test_a_torn_tail_of_a_dead_writer_is_skipped_and_counted(tmp_path: Path) -> None:
    journal_of(tmp_path / "journal", 3)
    (segment,) = list_segments(tmp_path / "journal")
    with segment.open("ab") as file:  # a frame cut short, as by a kill inside write(2)
        file.write(b"\x40\x00\x00\x00\x01\x02")
    made = ingester(tmp_path)
    assert made.ingest_once() == 3
    assert made.stats.torn_bytes == 6
    assert list_segments(tmp_path / "journal") == []


def test_records_wait_in_the_journal_while_the_database_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = journal_of(tmp_path / "journal", 5)
    made = ingester(tmp_path)
    engine = made._engine
    assert engine is not None
    real_begin = engine.begin
    down = {"yes": True}

    def begin() -> object:
        if down["yes"]:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        return real_begin()

    monkeypatch.setattr(engine, "begin", begin)
    assert made.ingest_once() == 0
    assert made.pause == RETRY_SECONDS[0] != made.interval_s  # backing off
    assert made.backlog_bytes() > 0
    down["yes"] = False
    assert made.ingest_once() == 5
    assert made.pause == made.interval_s
    assert read_predictions(url_for(tmp_path)).request_ids == ids


def test_only_one_ingester_holds_a_directory(tmp_path: Path) -> None:
    stop = threading.Event()
    with ingester_lock(tmp_path) as first:
        assert first
        stop.set()
        with ingester_lock(tmp_path, stop) as second:
            assert not second
    with ingester_lock(tmp_path) as again:  # released with its holder
        assert again


def test_inputs_keep_their_dtype_through_the_journal(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "journal")
    writer.open()
    whole = dataclasses.replace(record("whole"), inputs=np.full((1, 1, 8, 8), 7.0, np.float32))
    writer.append(whole)
    writer.close()
    ingester(tmp_path).ingest_once()
    logged = read_predictions(url_for(tmp_path))
    np.testing.assert_array_equal(logged.inputs[0], whole.inputs[0])


def test_retention_keeps_the_newest_rows_and_drops_old_ones(tmp_path: Path) -> None:
    import time

    from opsloop.serve.ingest import Retention

    writer = JournalWriter(tmp_path / "journal")
    writer.open()
    old = dataclasses.replace(record("old", rows=2), created_at=time.time() - 7200)
    writer.append(old)
    for i in range(6):
        writer.append(record(f"new{i}", rows=2))
    writer.close()
    kept: list[object] = []
    made = Ingester(
        tmp_path / "journal",
        url_for(tmp_path),
        retention=Retention(max_age_s=3600, max_rows=8),
        on_housekeeping=kept.append,
    )
    made.open()
    assert made.ingest_once() == 14
    done = made.housekeep(now=True)
    assert done is not None
    assert kept == [done]
    assert done.deleted_rows == 2 + 4  # the old request by age, then two more by count
    assert done.rows == 8
    assert done.bytes > 0
    assert read_predictions(url_for(tmp_path)).request_ids == [
        f"new{i}" for i in range(2, 6) for _ in range(2)
    ]


def test_housekeeping_measures_the_log(tmp_path: Path) -> None:
    journal_of(tmp_path / "journal", 30)
    made = ingester(tmp_path)
    made.ingest_once()
    done = made.housekeep(now=True)
    assert done is not None
    assert (done.rows, done.deleted_rows, done.backlog_bytes) == (30, 0, 0)
    database = tmp_path / "logs" / "predictions.db"
    wal = database.with_name(database.name + "-wal")
    on_disk = database.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    assert done.bytes == on_disk
    assert made.housekeep() is None  # not again within the minute
