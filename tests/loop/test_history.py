"""The loop database: runs recorded as they go, and a lock that a killed holder gives back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opsloop.errors import OpsloopError
from opsloop.loop.history import FAILED, RUNNING, History, RunLock


def test_a_run_is_recorded_and_updated(tmp_path: Path) -> None:
    history = History(f"sqlite:///{tmp_path / 'loop.db'}")
    run_id = history.create("accuracy", "online accuracy fell", {"labelled": 80}, RUNNING)
    history.update(run_id, started_at=1.0, data_hash="ab" * 32, promoted=False)
    record = history.get(run_id)
    assert (record.trigger, record.state, record.evidence) == (
        "accuracy",
        RUNNING,
        {"labelled": 80},
    )
    assert record.data_hash == "ab" * 32
    assert history.in_state(RUNNING) == [record]
    assert history.started_since(0.5) == 1
    assert history.counts() == {("accuracy", RUNNING): 1}
    with pytest.raises(OpsloopError, match="no loop run 99"):
        history.get(99)
    history.dispose()


def test_one_holder_at_a_time_and_released_when_the_holder_dies(tmp_path: Path) -> None:
    check_one_holder_and_release_on_death(f"sqlite:///{tmp_path / 'loop.db'}")


def check_one_holder_and_release_on_death(url: str, release_within_s: float = 5.0) -> None:
    """What `RunLock` promises on any database: one holder, and a killed holder lets go."""
    first, second = RunLock(url), RunLock(url)
    assert first.acquire()
    assert not second.acquire()
    assert second.held_elsewhere()
    first.release()
    with second.held() as mine:
        assert mine
        assert first.held_elsewhere()
    # A process that holds the lock and is killed with SIGKILL gives it back.
    code = (
        "import sys, time; from opsloop.loop.history import RunLock;"
        f"lock = RunLock({url!r}); assert lock.acquire(); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert not first.acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + release_within_s
        while not first.acquire():
            assert time.monotonic() < deadline, "the dead holder's lock was never released"
            time.sleep(0.05)
        first.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_bad_database_url_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(OpsloopError, match="OPSLOOP_LOOP_DB_URL"):
        History("nope://x")
    assert FAILED == "failed"
