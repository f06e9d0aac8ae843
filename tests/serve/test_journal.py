"""The prediction journal: frames that read back exactly, torn tails, segments and their seal."""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest

from opsloop.errors import ConfigError
from opsloop.serve.journal import (
    FRAME,
    MAX_PAYLOAD,
    JournalWriter,
    LogRecord,
    batches_of,
    decode_frames,
    encode_batches,
    frame_size,
    is_sealed,
    iter_records,
    list_segments,
)


def record(request_id: str, rows: int = 1) -> LogRecord:
    rng = np.random.default_rng(len(request_id) + rows)
    return LogRecord(
        request_id=request_id,
        created_at=1_700_000_000.25,
        endpoint="predict",
        model_name="digits",
        model_version="7",
        inputs=(rng.random((rows, 1, 8, 8)) * 16).astype(np.float32),
        probabilities=rng.dirichlet(np.ones(10), size=rows).astype(np.float32),
        embedding=rng.random((rows, 32)).astype(np.float32),
        latency_ms=2.5,
        role="shadow",
    )


def frame(*records: LogRecord) -> bytes:
    """The records' frames, as a writer's `append_many` writes them."""
    return encode_batches(batches_of(records))


def assert_same(left: LogRecord, right: LogRecord) -> None:
    for field in ("request_id", "created_at", "endpoint", "model_name", "model_version"):
        assert getattr(left, field) == getattr(right, field)
    assert (left.latency_ms, left.role) == (right.latency_ms, right.role)
    for name in ("inputs", "probabilities", "embedding"):
        a, b = getattr(left, name), getattr(right, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_a_frame_reads_back_exactly() -> None:
    original = record("é-unicode-id", rows=3)
    frames = decode_frames(frame(original), base=100, max_records=10)
    assert not frames.corrupt
    assert frames.end == 100 + len(frame(original))
    assert_same(frames.records[0], original)


def test_an_incomplete_last_frame_is_left_for_later() -> None:
    first, second = frame(record("a")), frame(record("b"))
    for cut in (1, FRAME.size, len(second) - 1):  # inside the length, at the header, the data
        frames = decode_frames(first + second[:cut], base=0, max_records=10)
        assert [r.request_id for r in frames.records] == ["a"]
        assert frames.end == len(first)
        assert not frames.corrupt


def test_a_damaged_frame_is_reported_not_decoded() -> None:
    first, second = frame(record("a")), bytearray(frame(record("b")))
    second[-3] ^= 0xFF
    frames = decode_frames(first + bytes(second), base=0, max_records=10)
    assert [r.request_id for r in frames.records] == ["a"]
    assert frames.corrupt
    assert frames.end == len(first)


def test_max_records_limits_one_read() -> None:
    data = b"".join(frame(record(f"r{i}")) for i in range(5))
    frames = decode_frames(data, base=0, max_records=2)
    assert [r.request_id for r in frames.records] == ["r0", "r1"]
    rest = decode_frames(data[frames.end :], base=frames.end, max_records=10)
    assert [r.request_id for r in rest.records] == ["r2", "r3", "r4"]


def test_one_frame_holds_a_batch_of_records_that_read_back_exactly() -> None:
    originals = [record("a", rows=2), record("b"), record("c", rows=4)]
    data = frame(*originals)
    assert FRAME.unpack_from(data)[0] == len(data) - FRAME.size  # one frame for all three
    frames = decode_frames(data, base=0, max_records=10)
    assert [len(batch) for batch in frames.batches] == [3]
    for read, original in zip(frames.records, originals, strict=True):
        assert_same(read, original)


def test_records_of_other_shapes_get_frames_of_their_own_in_order() -> None:
    wide = dataclasses.replace(record("wide"), probabilities=np.ones((1, 3), np.float32))
    originals = [record("a"), record("b"), wide, record("c")]
    frames = decode_frames(frame(*originals), base=0, max_records=10)
    assert [batch.request_ids for batch in frames.batches] == [["a", "b"], ["wide"], ["c"]]
    for read, original in zip(frames.records, originals, strict=True):
        assert_same(read, original)


def test_a_frame_is_never_split_to_keep_to_max_records() -> None:
    data = frame(*(record(f"r{i}") for i in range(5))) + frame(record("next"))
    frames = decode_frames(data, base=0, max_records=2)
    assert [r.request_id for r in frames.records] == [f"r{i}" for i in range(5)]
    assert frames.count == 5


def test_frame_size_reads_the_length_and_refuses_impossible_ones() -> None:
    data = frame(record("a", rows=3))
    assert frame_size(data) == len(data)
    assert frame_size(data[: FRAME.size - 1]) == 0  # too short to say
    impossible = FRAME.pack(MAX_PAYLOAD + 1, 0)  # not worth reading 256 MiB to find out
    assert frame_size(impossible) == 0
    assert decode_frames(impossible, base=0, max_records=1).corrupt


def test_one_record_frames_of_earlier_versions_still_read_back() -> None:
    original = record("old", rows=2)
    arrays = (original.inputs, original.probabilities, original.embedding)
    header = orjson.dumps(  # the version 1 layout: one record, scalar fields
        {
            "r": original.request_id,
            "t": original.created_at,
            "e": original.endpoint,
            "n": original.model_name,
            "v": original.model_version,
            "l": original.latency_ms,
            "o": original.role,
            "a": [[array.dtype.str, array.shape] for array in arrays],
        }
    )
    payload = struct.pack("<H", len(header)) + header + b"".join(a.tobytes() for a in arrays)
    old = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    (read,) = decode_frames(old, base=0, max_records=10).records
    assert_same(read, original)
    assert read.sample_rate == 1.0  # not written then: everything was logged


def test_the_writer_rotates_segments_and_seals_the_ones_it_left(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, segment_bytes=2000)
    writer.open()
    records = [record(f"r{i}") for i in range(12)]
    for item in records:
        assert writer.append(item)
    segments = list_segments(tmp_path)
    assert len(segments) > 1
    assert [is_sealed(path) for path in segments] == [True] * (len(segments) - 1) + [False]
    writer.close()
    assert is_sealed(segments[-1])
    read = [r for path in segments for r in iter_records(path)]
    assert [r.request_id for r in read] == [r.request_id for r in records]
    assert not list(tmp_path.glob(".*"))  # no half-made segment left behind


def test_segments_of_different_writers_never_collide(tmp_path: Path) -> None:
    first, second = JournalWriter(tmp_path), JournalWriter(tmp_path)
    first.open()
    second.open()
    first.append(record("one"))
    second.append(record("two"))
    first.close()
    second.close()
    assert first.writer != second.writer
    assert len(list_segments(tmp_path)) == 2


def test_a_killed_writer_leaves_a_sealed_readable_segment(tmp_path: Path) -> None:
    # Another process appends, reports each acknowledged id, then is killed outright.
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from tests.serve.test_journal import record
        from opsloop.serve.journal import JournalWriter
        writer = JournalWriter(Path({str(tmp_path)!r}))
        writer.open()
        for i in range(200):
            writer.append(record(f"r{{i}}"))
            print(f"r{{i}}", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(200)]
    (segment,) = list_segments(tmp_path)
    assert not is_sealed(segment)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    deadline = time.monotonic() + 5
    while not is_sealed(segment):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [r.request_id for r in iter_records(segment)] == acknowledged


def test_an_unwritable_journal_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"cannot write the prediction journal.*JOURNAL_DIR"):
        JournalWriter(blocker / "journal").open()


def test_fsync_mode_writes_the_same_frames(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, fsync=True)
    writer.open()
    writer.append(record("durable"))
    writer.close()
    (segment,) = list_segments(tmp_path)
    assert_same(next(iter_records(segment)), record("durable"))


def test_several_records_in_one_write_read_back_in_order(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path)
    writer.open()
    batch = [record("a"), record("bb", rows=2), record("ccc")]
    assert writer.append_many(batch)
    writer.close()
    (segment,) = list_segments(tmp_path)
    read = list(iter_records(segment))
    assert [r.request_id for r in read] == ["a", "bb", "ccc"]
    for written, back in zip(batch, read, strict=True):
        assert_same(written, back)
