"""Bytes per logged prediction: the prediction log as it is, against opsloop 0.1's table.

Writes the same predictions — shaped like the digits model's: 8x8 whole-number pixels, 10 class
probabilities, a 128-wide embedding — through the real journal and ingester into SQLite, and
into a copy of the 0.1 layout (one row per example, every request field repeated, float32
outputs, the whole embedding, three indexes), then divides each database's size on disk by the
rows it holds. Two traffic shapes: single-row requests with server ids, and 64-row batches with
a 128-character client id. Ingest speed (rows per second through journal and ingester) too.

    uv run --no-sync python benchmarks/predlog_size.py [--rows 20000] [--write-docs]
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from docs_block import publish

from opsloop.bundle import LogBasis
from opsloop.serve.ingest import Ingester
from opsloop.serve.journal import JournalWriter, LogRecord
from opsloop.serve.protocol import new_request_id

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "predlog-size.json"
DOCS = REPO / "docs" / "serving.md"
BLOCK = "predlog-size"  # its markers in the docs page: <!-- benchmark:predlog-size:start/end -->
EMBEDDING = 128
CLIENT_ID = "order-" + "x" * 122  # 128 characters, the longest id the server accepts


def records(count: int, batch: int, rng: np.random.Generator) -> Iterator[tuple[str, Any]]:
    """(server-style request id, outputs) of `count` examples in requests of `batch` rows."""
    for _ in range(count // batch):
        inputs = rng.integers(0, 17, (batch, 1, 8, 8)).astype(np.float32)
        probabilities = rng.dirichlet(np.ones(10), size=batch).astype(np.float32)
        embedding = np.maximum(rng.normal(size=(batch, EMBEDDING)), 0).astype(np.float32)
        yield (new_request_id() if batch == 1 else CLIENT_ID), (inputs, probabilities, embedding)


def current_layout(workdir: Path, count: int, batch: int, basis: LogBasis) -> dict[str, float]:
    """Journal + ingester into the current tables; size per row and ingest speed."""
    database = workdir / f"current-{batch}.db"
    writer = JournalWriter(workdir / f"journal-{batch}")
    writer.open()
    for request_id, (inputs, probabilities, embedding) in records(
        count, batch, np.random.default_rng(0)
    ):
        writer.append(
            LogRecord(
                request_id=request_id,
                created_at=time.time(),
                endpoint="infer",
                model_name="digits-cnn",
                model_version="12",
                inputs=inputs,
                probabilities=probabilities,
                embedding=basis.project(embedding),
                latency_ms=1.25,
            )
        )
    writer.close()
    journal_bytes = sum(p.stat().st_size for p in (workdir / f"journal-{batch}").glob("*.journal"))
    ingester = Ingester(workdir / f"journal-{batch}", f"sqlite:///{database}", batch_rows=2048)
    ingester.open()
    started = time.perf_counter()
    rows = 0
    while written := ingester.ingest_once():
        rows += written
    seconds = time.perf_counter() - started
    ingester.close()
    return {
        "bytes_per_row": on_disk(database) / rows,
        "journal_bytes_per_row": journal_bytes / rows,
        "ingest_rows_per_s": rows / seconds,
    }


LEGACY_DDL = """
CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL,
  item INTEGER NOT NULL, created_at FLOAT NOT NULL, endpoint VARCHAR(16) NOT NULL,
  model_name VARCHAR(128) NOT NULL, model_version VARCHAR(64) NOT NULL, input BLOB NOT NULL,
  input_dtype VARCHAR(8) NOT NULL, input_shape VARCHAR(64) NOT NULL,
  probabilities BLOB NOT NULL, embedding BLOB NOT NULL, label INTEGER NOT NULL,
  confidence FLOAT NOT NULL, latency_ms FLOAT NOT NULL, role VARCHAR(16) NOT NULL);
CREATE INDEX ix_predictions_request_id ON predictions (request_id);
CREATE INDEX ix_predictions_created_at ON predictions (created_at);
CREATE INDEX ix_predictions_model_version ON predictions (model_version);
"""


def legacy_layout(workdir: Path, count: int, batch: int) -> float:
    """The 0.1 table (as its writer filled it, ids were UUID hex); bytes per row."""
    database = workdir / f"legacy-{batch}.db"
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(LEGACY_DDL)
        for request_id, (inputs, probabilities, embedding) in records(
            count, batch, np.random.default_rng(0)
        ):
            own = uuid.uuid4().hex if batch == 1 else request_id
            connection.executemany(
                "INSERT INTO predictions (request_id, item, created_at, endpoint, model_name, "
                "model_version, input, input_dtype, input_shape, probabilities, embedding, "
                "label, confidence, latency_ms, role) VALUES (?, ?, ?, 'infer', 'digits-cnn', "
                "'12', ?, 'uint8', '[1,8,8]', ?, ?, ?, ?, 1.25, 'champion')",
                [
                    (
                        own,
                        item,
                        time.time(),
                        inputs[item].astype(np.uint8).tobytes(),
                        probabilities[item].tobytes(),
                        embedding[item].tobytes(),
                        int(probabilities[item].argmax()),
                        float(probabilities[item].max()),
                    )
                    for item in range(batch)
                ],
            )
    return on_disk(database) / count


def on_disk(database: Path) -> int:
    """The database's size once its write-ahead log is checkpointed into it (as SQLite does
    on its own every 1000 pages): the steady state, not a transient WAL."""
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    files = (database, database.with_name(database.name + "-wal"))
    return sum(path.stat().st_size for path in files if path.exists())


def run(count: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    basis = LogBasis.fit(np.maximum(rng.normal(size=(2000, EMBEDDING)), 0))
    assert basis is not None
    shapes = {}
    with tempfile.TemporaryDirectory(prefix="opsloop-predlog-size-") as scratch:
        for batch in (1, 64):
            workdir = Path(scratch)
            current = current_layout(workdir, count, batch, basis)
            legacy = legacy_layout(workdir, count, batch)
            shapes[str(batch)] = current | {"legacy_bytes_per_row": legacy}
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "rows": count,
        "shapes": shapes,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Measured {result['date']} with `benchmarks/predlog_size.py` ({result['rows']} rows "
        "per shape, SQLite):",
        "",
        "| requests | 0.1 table, bytes/row | now, bytes/row | ratio | journal bytes/row "
        "| ingest rows/s |",
        "|---|---|---|---|---|---|",
    ]
    names = {"1": "1 row, server id", "64": "64 rows, 128-character client id"}
    for batch, shape in result["shapes"].items():
        lines.append(
            f"| {names[batch]} | {shape['legacy_bytes_per_row']:.0f} | "
            f"{shape['bytes_per_row']:.0f} | "
            f"{shape['legacy_bytes_per_row'] / shape['bytes_per_row']:.1f}x | "
            f"{shape['journal_bytes_per_row']:.0f} | {shape['ingest_rows_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.rows)
    publish(result, RESULTS, table(result), DOCS, BLOCK, write_docs=args.write_docs)


if __name__ == "__main__":
    main()
