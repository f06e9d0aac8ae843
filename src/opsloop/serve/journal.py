"""The prediction journal: each serving process appends every prediction to its own file first.

A request's record is written — in one `write(2)` of a length-prefixed, checksummed frame, which
holds the records of a whole micro-batch — before its response is sent. Once `write` returns,
the bytes are in the operating system's page cache, which outlives the process: a SIGKILL of the
worker (or of every process at once) loses no acknowledged prediction. `fsync=True` also
survives a power loss, at the cost of a disk flush per write (`benchmarks/serve.py` measures
it). The ingester (`opsloop.serve.ingest`) moves the records into the SQL log and deletes what
it committed, so the worker never builds a SQL row.

Layout: a directory of segments `<writer>.<seq>.journal`, where `<writer>` is unique to one
process lifetime. A writer holds an exclusive `flock` on its open segment; a segment nobody holds
is sealed (its writer moved on to the next one, exited, or was killed), which is how the ingester
knows it may delete a segment once it has committed all of it. Frames:

    frame   = u32 payload length | u32 crc32(payload) | payload            (little-endian)
    payload = u16 header length | header (JSON) | inputs | probabilities | embedding

The header lists each record's request id, time, model, role, ... and example count, and each
array's dtype and shape; an array holds all the records' examples, in raw little-endian bytes,
read back as a numpy view of the frame, so nothing is ever unpickled. A batch is columns, not
records, at both ends: written once per micro-batch, inserted as it was read.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import re
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

from opsloop.errors import ConfigError
from opsloop.predictions import CHAMPION_ROLE

logger = logging.getLogger(__name__)
T = TypeVar("T")

FRAME = struct.Struct("<II")  # payload length, crc32
HEADER_LENGTH = struct.Struct("<H")
SUFFIX = ".journal"
SEGMENT_NAME = re.compile(r"^(?P<writer>[A-Za-z0-9_.-]+)\.(?P<seq>\d{8})\.journal$")
# A frame longer than this is corruption, not a record (a request is capped far below it).
MAX_PAYLOAD = 256 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
# While over `max_bytes`, how often a writer looks again whether the ingester made room.
SPACE_RECHECK_S = 1.0


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class LogRecord:
    """One request's predictions, as the worker answered them."""

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
    sample_rate: float = 1.0  # the share of requests being logged (OPSLOOP_PREDLOG_SAMPLE)


LIST_FIELDS = (
    "request_ids",
    "created_at",
    "endpoints",
    "model_names",
    "model_versions",
    "latency_ms",
    "roles",
    "sample_rates",
    "rows",
)
ARRAY_FIELDS = ("inputs", "probabilities", "embedding")


@dataclass(slots=True)
class RecordBatch:
    """Records side by side: one list per field, each array concatenated over their examples.

    What one frame holds: the answers of one micro-batch are written as one batch, and the
    ingester turns batches into table rows column by column, never record by record.
    """

    request_ids: list[str]
    created_at: list[float]
    endpoints: list[str]
    model_names: list[str]
    model_versions: list[str]
    latency_ms: list[float]
    roles: list[str]
    sample_rates: list[float]
    rows: list[int]  # each record's examples, in order
    inputs: npt.NDArray[Any]
    probabilities: npt.NDArray[Any]
    embedding: npt.NDArray[Any]

    def __len__(self) -> int:
        return len(self.request_ids)

    @classmethod
    def of(cls, records: Sequence[LogRecord]) -> RecordBatch:
        """The batch of same-shaped records (`batches_of` splits any others)."""
        return cls(
            [r.request_id for r in records],
            [r.created_at for r in records],
            [r.endpoint for r in records],
            [r.model_name for r in records],
            [r.model_version for r in records],
            [r.latency_ms for r in records],
            [r.role for r in records],
            [r.sample_rate for r in records],
            [len(r.inputs) for r in records],
            stacked([r.inputs for r in records]),
            stacked([r.probabilities for r in records]),
            stacked([r.embedding for r in records]),
        )

    @classmethod
    def joined(cls, batches: Sequence[RecordBatch]) -> RecordBatch:
        """One batch of same-shaped batches, in order."""
        if len(batches) == 1:
            return batches[0]
        fields: dict[str, Any] = {
            name: list(itertools.chain.from_iterable(getattr(b, name) for b in batches))
            for name in LIST_FIELDS
        }
        fields |= {name: stacked([getattr(b, name) for b in batches]) for name in ARRAY_FIELDS}
        return cls(**fields)

    def shape_key(self) -> tuple[Any, ...]:
        """What must match for batches to be joined: each array's dtype and example shape."""
        return _shape_key(self.inputs, self.probabilities, self.embedding)

    def records(self) -> list[LogRecord]:
        """The records one by one (for tests and inspection; the ingester never splits)."""
        bounds = np.cumsum([0, *self.rows]).tolist()
        return [
            LogRecord(
                request_id=self.request_ids[i],
                created_at=self.created_at[i],
                endpoint=self.endpoints[i],
                model_name=self.model_names[i],
                model_version=self.model_versions[i],
                inputs=self.inputs[bounds[i] : bounds[i + 1]],
                probabilities=self.probabilities[bounds[i] : bounds[i + 1]],
                embedding=self.embedding[bounds[i] : bounds[i + 1]],
                latency_ms=self.latency_ms[i],
                role=self.roles[i],
                sample_rate=self.sample_rates[i],
            )
            for i in range(len(self))
        ]


def stacked(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """The arrays one after the other (the one array itself, uncopied, when alone)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def consecutive_runs(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """`items` cut into runs of neighbours with equal `key`, in order."""
    runs: list[list[T]] = []
    previous: Hashable = object()  # equal to no key
    for item in items:
        current = key(item)
        if current != previous:
            runs.append([])
            previous = current
        runs[-1].append(item)
    return runs


def _shape_key(*arrays: npt.NDArray[Any]) -> tuple[Any, ...]:
    return tuple((array.dtype, array.shape[1:]) for array in arrays)


def batches_of(records: Sequence[LogRecord]) -> list[RecordBatch]:
    """The records as batches, in order: one, unless their examples differ in shape (a model
    swap, or a canary with other classes) — then a new batch wherever the shape changes."""
    try:
        return [RecordBatch.of(records)]
    except ValueError:  # np.concatenate joins arrays only when all but the first axis match
        pass
    runs = consecutive_runs(records, lambda r: _shape_key(r.inputs, r.probabilities, r.embedding))
    return [RecordBatch.of(run) for run in runs]


def encode_batches(batches: Sequence[RecordBatch]) -> bytes:
    """The batches as frames, one each: what `decode_frames` reads back."""
    if len(batches) == 1:
        return encode_batch(batches[0])
    return b"".join(map(encode_batch, batches))


def encode_batch(batch: RecordBatch) -> bytes:
    """One frame holding a whole batch."""
    arrays = (batch.inputs, batch.probabilities, batch.embedding)
    header = orjson.dumps(
        {
            "k": batch.rows,
            "r": batch.request_ids,
            "t": batch.created_at,
            "e": batch.endpoints,
            "n": batch.model_names,
            "v": batch.model_versions,
            "l": batch.latency_ms,
            "o": batch.roles,
            "s": batch.sample_rates,
            "a": [[_dtype_text(array.dtype), array.shape] for array in arrays],
        }
    )
    payload = b"".join(
        (
            HEADER_LENGTH.pack(len(header)),
            header,
            # row-major bytes, whatever the array's layout
            *(array.tobytes() for array in arrays),
        )
    )
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@functools.cache
def _dtype_text(dtype: np.dtype[Any]) -> str:
    return dtype.str  # cached: numpy builds this string anew on every access (~0.35 us)


@functools.cache
def _dtype(text: str) -> np.dtype[Any]:
    return np.dtype(text)  # cached: building a dtype from its text costs more than the frame


def decode_payload(payload: bytes | memoryview) -> RecordBatch:
    """The batch in one frame's payload (checked by the caller's checksum)."""
    (header_length,) = HEADER_LENGTH.unpack_from(payload)
    start = HEADER_LENGTH.size
    header: dict[str, Any] = orjson.loads(payload[start : start + header_length])
    offset = start + header_length
    arrays: list[npt.NDArray[Any]] = []
    for dtype_text, shape in header["a"]:
        array: npt.NDArray[Any] = np.ndarray(shape, _dtype(dtype_text), payload, offset)
        arrays.append(array)  # a read-only view of the payload, like np.frombuffer's
        offset += array.nbytes
    inputs, probabilities, embedding = arrays
    if "k" not in header:  # one record per frame, as earlier versions wrote
        header = {key: [value] for key, value in header.items()} | {"k": [len(inputs)]}
    return RecordBatch(
        request_ids=header["r"],
        created_at=header["t"],
        endpoints=header["e"],
        model_names=header["n"],
        model_versions=header["v"],
        latency_ms=header["l"],
        roles=header["o"],
        sample_rates=header.get("s", [1.0] * len(header["r"])),
        rows=header["k"],
        inputs=inputs,
        probabilities=probabilities,
        embedding=embedding,
    )


@dataclass(frozen=True, slots=True)
class Frames:
    """The whole frames in a stretch of a segment, and where the next one starts."""

    batches: list[RecordBatch]
    end: int  # the offset just past the last whole frame
    corrupt: bool  # a frame failed its checksum or its length is impossible

    @property
    def count(self) -> int:
        """The records in all the batches."""
        return sum(map(len, self.batches))

    @property
    def records(self) -> list[LogRecord]:
        """The records one by one (for tests and inspection)."""
        return [record for batch in self.batches for record in batch.records()]


def frame_size(data: bytes) -> int:
    """The bytes of the frame `data` starts with, as its length says; 0 when `data` is too
    short to say or the length is impossible (`decode_frames` reports that as corrupt)."""
    if len(data) < FRAME.size:
        return 0
    length, _ = FRAME.unpack_from(data)
    return 0 if length > MAX_PAYLOAD else int(FRAME.size + length)


def decode_frames(data: bytes | memoryview, base: int, max_records: int) -> Frames:
    """Whole frames from `data` (read at segment offset `base`), stopping once they hold
    `max_records` records or more (a frame is never split).

    An incomplete frame at the end stops the read without error: its writer may be writing it
    right now, or was killed inside `write` — in which case it was never acknowledged.
    """
    batches: list[RecordBatch] = []
    count = 0
    position = 0
    while count < max_records and position + FRAME.size <= len(data):
        length, checksum = FRAME.unpack_from(data, position)
        if length > MAX_PAYLOAD:
            return Frames(batches, base + position, corrupt=True)
        start = position + FRAME.size
        if start + length > len(data):
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != checksum:
            return Frames(batches, base + position, corrupt=True)
        batches.append(decode_payload(payload))
        count += len(batches[-1])
        position = start + length
    return Frames(batches, base + position, corrupt=False)


def segment_path(directory: Path, writer: str, seq: int) -> Path:
    return directory / f"{writer}.{seq:08d}{SUFFIX}"


def list_segments(directory: Path) -> list[Path]:
    """Every segment in `directory`, each writer's in the order they were written."""
    found: list[tuple[str, int, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = SEGMENT_NAME.match(entry.name)
            if match is not None:
                found.append((match["writer"], int(match["seq"]), Path(entry.path)))
    return [path for _, _, path in sorted(found)]


def is_sealed(path: Path) -> bool:
    """No process holds the segment open for writing (a held `flock` is a live writer's)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the descriptor releases a lock taken above
    return True


def journal_bytes(directory: Path) -> int:
    """The bytes all segments in `directory` take (what the ingester has not yet deleted)."""
    total = 0
    for path in list_segments(directory):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # deleted by the ingester meanwhile
            continue
    return total


def check_writable(directory: Path) -> None:
    """Create `directory` if needed; a ConfigError naming it when no journal can be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write the prediction journal in {directory}: {exc.strerror or exc}; set "
            "OPSLOOP_JOURNAL_DIR to a writable directory"
        ) from exc


def new_writer_name() -> str:
    """A name no other process lifetime will use: host, pid and a random token."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class JournalWriter:
    """One process's journal: `append` writes a record to the open segment before returning.

    Not thread-safe by design: a serving process appends from its event loop only.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = False,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.on_dropped = on_dropped
        self.writer = new_writer_name()
        self.rows_dropped = 0
        self._seq = 0
        self._fd: int | None = None
        self._size = 0
        self._full_until = 0.0  # while over max_bytes: when to look for room again

    def open(self) -> None:
        """Create the directory and the first segment (a ConfigError naming it if impossible)."""
        check_writable(self.directory)
        self._open_segment()

    def append(self, record: LogRecord) -> bool:
        """Write one record; False (and counted as dropped) when the journal is full."""
        return self.append_many((record,))

    def append_many(self, records: Sequence[LogRecord]) -> bool:
        """Write `records` in one `write`; False (all counted as dropped) when it is full."""
        return self.append_batches(batches_of(records))

    def append_batches(self, batches: Sequence[RecordBatch]) -> bool:
        """Write `batches` in one `write`; False (all counted as dropped) when it is full."""
        if self._fd is None:
            raise RuntimeError("the journal is not open")
        if self._size >= self.segment_bytes and not self._rotate():
            self._drop(sum(len(batch.inputs) for batch in batches))
            return False
        frame = encode_batches(batches)
        written = os.write(self._fd, frame)
        if written != len(frame):  # a full disk mid-frame: the ingester skips the torn tail
            self._size = self.segment_bytes  # move on to a fresh segment next time
            raise OSError(f"short write to the prediction journal ({written} of {len(frame)})")
        if self.fsync:
            os.fdatasync(self._fd)
        self._size += written
        return True

    def close(self) -> None:
        """Close the open segment, which seals it for the ingester."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_segment(self) -> None:
        """Create the next segment locked: made under a name the ingester ignores, locked, then
        renamed, so the ingester never sees it unlocked (and empty, so deletable)."""
        self._seq += 1
        path = segment_path(self.directory, self.writer, self._seq)
        hidden = path.with_name(f".{path.name}.new")
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else holds it
        hidden.rename(path)
        self._fd, self._size = fd, 0

    def _rotate(self) -> bool:
        """Seal the full segment and open the next, unless the journal is over `max_bytes`."""
        now = time.monotonic()
        if now < self._full_until:
            return False
        if journal_bytes(self.directory) >= self.max_bytes:
            self._full_until = now + SPACE_RECHECK_S
            return False
        previous = self._fd
        self._open_segment()
        if previous is not None:
            os.close(previous)
        return True

    def _drop(self, rows: int) -> None:
        self.rows_dropped += rows
        if self.on_dropped is not None:
            self.on_dropped(rows)
        if self.rows_dropped == rows or self.rows_dropped % 10_000 < rows:
            logger.error(
                "prediction journal over OPSLOOP_JOURNAL_MAX_BYTES=%d (is the ingester or the "
                "database down?): %d rows dropped so far",
                self.max_bytes,
                self.rows_dropped,
            )


def iter_records(path: Path) -> Iterator[LogRecord]:
    """Every whole record of one segment (for tests and inspection)."""
    data = path.read_bytes()
    yield from decode_frames(data, 0, max_records=len(data)).records
