"""The loop's database on PostgreSQL: runs recorded, and the one-run lock across processes."""

from __future__ import annotations

import pytest

from opsloop.loop.history import RUNNING, SUCCEEDED, History
from tests.loop.test_history import check_one_holder_and_release_on_death

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
    # The server notices the dead holder's connection close: allow it a little longer.
    check_one_holder_and_release_on_death(postgres_url, release_within_s=15.0)
