"""The loop's database on PostgreSQL: runs recorded, and the one-run lock across processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from opsloop.loop.history import RUNNING, SUCCEEDED, History, RunLock

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_runs_are_recorded_on_postgresql(postgres_url: str) -> None:
    history = History(postgres_url)
    first = history.create("drift", "drift in 3 detectors", {"p_value": 1e-9}, RUNNING)
    history.update(first, started_at=10.0, data_hash="cd" * 32)
    history.update(first, state=SUCCEEDED, finished_at=20.0, promoted=True, model_version="4")
    second = history.create("manual", "asked for", {}, RUNNING)
    assert [run.id for run in history.recent()] == [second, first]
    record = history.get(first)
    assert (record.state, record.promoted, record.model_version) == (SUCCEEDED, True, "4")
    assert record.evidence == {"p_value": 1e-9}
    assert history.last_promoted() == record
    assert history.counts() == {("drift", SUCCEEDED): 1, ("manual", RUNNING): 1}
    history.dispose()
    assert [run.id for run in History(postgres_url).recent()] == [second, first]  # persisted


def test_the_advisory_lock_admits_one_holder_and_a_killed_one_lets_go(postgres_url: str) -> None:
    first, second = RunLock(postgres_url), RunLock(postgres_url)
    assert first.acquire()
    assert not second.acquire()
    assert second.held_elsewhere()
    first.release()
    with second.held() as mine:
        assert mine
        assert first.held_elsewhere()
    code = (
        "import time; from opsloop.loop.history import RunLock;"
        f"lock = RunLock({postgres_url!r}); assert lock.acquire(); print('held', flush=True);"
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert not first.acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 15  # the server notices the dead connection
        while not first.acquire():
            assert time.monotonic() < deadline, "the killed holder's lock was never released"
            time.sleep(0.1)
        first.release()
    finally:
        holder.kill()
        holder.wait()
