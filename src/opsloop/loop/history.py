"""The loop's own record: one row per run in the loop database, and the lock that keeps runs single.

Every run — what triggered it and the evidence, the data version it built, the MLflow run and the
model version it trained, the gate's decision and whether it promoted — is one `loop_runs` row,
written when the run starts and updated as it goes, so a run killed mid-way is still on record.
The database is SQLite in the workspace by default and any SQLAlchemy URL (PostgreSQL) for teams;
`RunLock` is a file lock beside a SQLite database and a PostgreSQL advisory lock otherwise, so one
run at a time holds across processes and machines, and a crashed holder releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from opsloop.errors import OpsloopError, first_line, redact_url
from opsloop.predictions import open_engine

logger = logging.getLogger(__name__)

# A run's states: what it is doing, or how it ended.
RUNNING, SUCCEEDED, REFUSED, FAILED, SKIPPED, DRY_RUN, DISPATCHED = (
    "running",
    "succeeded",
    "refused",
    "failed",
    "skipped",
    "dry_run",
    "dispatched",
)
FINISHED = (SUCCEEDED, REFUSED, FAILED)
# The advisory lock's key on PostgreSQL: any fixed 64-bit number, the same for every controller.
ADVISORY_KEY = 0x6F70736C6F6F70  # "opsloop"

metadata = MetaData()
runs = Table(
    "loop_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trigger", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("evidence", Text, nullable=False),  # JSON
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("runner", String(32)),
    Column("base_hash", String(64)),  # the base dataset's content hash when the run started
    Column("data_name", String(128)),
    Column("data_hash", String(64)),  # the production data version it built
    Column("labels", Integer),  # labelled production examples in that version
    Column("mlflow_run_id", String(64)),
    Column("model_version", String(32)),
    Column("champion_before", String(32)),
    Column("decision", Text),
    Column("promoted", Boolean),
    Column("error", Text),
)


@dataclass(frozen=True)
class RunRecord:
    """One row of the loop's history."""

    id: int
    trigger: str
    reason: str
    evidence: dict[str, Any]
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    host: str | None
    pid: int | None
    runner: str | None
    base_hash: str | None
    data_name: str | None
    data_hash: str | None
    labels: int | None
    mlflow_run_id: str | None
    model_version: str | None
    champion_before: str | None
    decision: str | None
    promoted: bool | None
    error: str | None


class History:
    """The `loop_runs` table of one loop database."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = open_engine(url, create=True)
            metadata.create_all(self.engine)
        except (SQLAlchemyError, OpsloopError, OSError) as exc:
            raise OpsloopError(
                f"cannot open the loop database {redact_url(url)}: {first_line(exc)}; fix "
                "OPSLOOP_LOOP_DB_URL"
            ) from exc

    def create(self, trigger: str, reason: str, evidence: dict[str, Any], state: str) -> int:
        """A new run row; its id."""
        values = {
            "trigger": trigger,
            "reason": reason,
            "evidence": json.dumps(evidence, default=str),
            "state": state,
            "created_at": time.time(),
        }
        with self.engine.begin() as connection:
            result = connection.execute(insert(runs).values(values))
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def update(self, run_id: int, **values: Any) -> None:
        if "evidence" in values:
            values["evidence"] = json.dumps(values["evidence"], default=str)
        with self.engine.begin() as connection:
            connection.execute(update(runs).where(runs.c.id == run_id).values(values))

    def get(self, run_id: int) -> RunRecord:
        with self.engine.connect() as connection:
            row = connection.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise OpsloopError(f"no loop run {run_id} in {redact_url(self.url)}")
        return _record(row)

    def recent(self, limit: int = 50) -> list[RunRecord]:
        """The newest runs, newest first."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
        return [_record(row) for row in rows]

    def in_state(self, *states: str) -> list[RunRecord]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(runs).where(runs.c.state.in_(states))).all()
        return [_record(row) for row in rows]

    def started_since(self, since: float) -> int:
        """Runs that started (or were dispatched) at or after `since`."""
        with self.engine.connect() as connection:
            query = select(func.count()).where(runs.c.started_at >= since)
            return int(connection.execute(query).scalar_one())

    def last_started(self) -> RunRecord | None:
        with self.engine.connect() as connection:
            query = select(runs).where(runs.c.started_at.is_not(None))
            row = connection.execute(query.order_by(runs.c.started_at.desc()).limit(1)).first()
        return None if row is None else _record(row)

    def last_promoted(self) -> RunRecord | None:
        with self.engine.connect() as connection:
            query = select(runs).where(runs.c.promoted.is_(True)).order_by(runs.c.id.desc())
            row = connection.execute(query.limit(1)).first()
        return None if row is None else _record(row)

    def counts(self) -> dict[tuple[str, str], int]:
        """Runs by (trigger, state), for the metrics."""
        with self.engine.connect() as connection:
            query = select(runs.c.trigger, runs.c.state, func.count()).group_by(
                runs.c.trigger, runs.c.state
            )
            return {(t, s): int(n) for t, s, n in connection.execute(query).all()}

    def dispose(self) -> None:
        self.engine.dispose()


def _record(row: Any) -> RunRecord:
    values = dict(row._mapping)
    values["evidence"] = json.loads(values["evidence"] or "{}")
    return RunRecord(**values)


def default_db_url(workspace: Path) -> str:
    """The embedded loop database: SQLite in the workspace, beside the other stores."""
    return f"sqlite:///{workspace.expanduser().resolve() / 'loop.db'}"


def this_host() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


class RunLock:
    """One loop run at a time, across processes and machines.

    SQLite: an exclusive `flock` on `<database>.lock`; PostgreSQL (or any other server):
    `pg_try_advisory_lock` on a connection held for the run. Both are released by the operating
    system or the database when their holder dies, so a crashed run never blocks the next one.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self._file: IO[bytes] | None = None
        self._connection: Connection | None = None
        self._engine: Engine | None = None
        self.path: Path | None = None
        if parsed.get_backend_name() == "sqlite":
            self.path = Path(f"{Path(parsed.database or 'loop.db').expanduser()}.lock")

    def acquire(self) -> bool:
        """Take the lock if it is free; False when another run holds it (never waits)."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("ab")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._file = handle
            return True
        self._engine = open_engine(self.url, create=False)
        connection = self._engine.connect()
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}
        ).scalar_one()
        if not taken:
            connection.close()
            return False
        self._connection = connection
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY}
                )
            self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def held_elsewhere(self) -> bool:
        """Whether some other process holds the lock right now."""
        if not self.acquire():
            return True
        self.release()
        return False

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """`with lock.held() as mine:` — `mine` says whether this process got it."""
        mine = self.acquire()
        try:
            yield mine
        finally:
            if mine:
                self.release()
