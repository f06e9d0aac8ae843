"""The loop's policy: one run at a time, a cooldown, a daily cap, enough new labels; and crashed
runs recorded, never run twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from opsloop.loop.controller import STARTUP_GRACE_SECONDS, Controller, decide
from opsloop.loop.history import FAILED, RUNNING, SKIPPED, History, RunLock
from opsloop.loop.settings import LoopSettings, load_loop_settings
from opsloop.loop.triggers import MANUAL, Trigger


class NoRunner:
    """Records what would have started; nothing runs (the work is tested end to end)."""

    name = "process"

    def __init__(self) -> None:
        self.started: list[int] = []

    def start(self, run_id: int) -> None:
        self.started.append(run_id)

    def running(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LoopSettings:
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", f"sqlite:///{tmp_path / 'predictions.db'}")
    return load_loop_settings(
        workspace=tmp_path,
        cooldown_seconds=600,
        max_runs_per_day=2,
        min_new_labels=10,
        overrides=f"data.processed_dir={tmp_path / 'processed'}",
    )


def test_the_limits_in_order(settings: LoopSettings, tmp_path: Path) -> None:
    history = History(settings.resolved_db_url())
    lock = RunLock(settings.resolved_db_url())
    trigger = Trigger("accuracy", "it fell")
    now = time.time()
    assert decide(trigger, settings, history, lock, 5, now) == (
        False,
        "5 new labels since the last run, fewer than 10 (OPSLOOP_LOOP_MIN_NEW_LABELS): "
        "nothing new to learn from",
    )
    go, why = decide(trigger, settings, history, lock, 50, now)
    assert go
    assert why == "accuracy: it fell"
    run = history.create("accuracy", why, {}, RUNNING)
    history.update(run, started_at=now - 60)
    assert "a run is in progress (run 1)" in decide(trigger, settings, history, lock, 50, now)[1]
    history.update(run, state="succeeded")
    assert (
        "cooldown: the last run (run 1) started 60 s ago"
        in decide(trigger, settings, history, lock, 50, now)[1]
    )
    other = history.create("accuracy", why, {}, "succeeded")
    history.update(other, started_at=now - 3600)
    later = now + 700  # past the cooldown, but two runs in 24 h already
    assert "2 runs in the last 24 h" in decide(trigger, settings, history, lock, 50, later)[1]
    assert lock.acquire()
    try:
        busy = RunLock(settings.resolved_db_url())
        assert "a run is in progress" in decide(trigger, settings, history, busy, 50, later)[1]
    finally:
        lock.release()


def test_a_manual_request_that_a_limit_holds_back_is_recorded(settings: LoopSettings) -> None:
    runner = NoRunner()
    controller = Controller(settings, runner)
    decision = controller.step(Trigger(MANUAL, "please"))
    assert not decision.run
    assert runner.started == []
    assert decision.run_id is not None
    record = controller.history.get(decision.run_id)
    assert record.state == SKIPPED
    assert "0 new labels since the last run" in record.reason
    controller.close()


def test_a_dry_run_records_what_it_would_do(settings: LoopSettings) -> None:
    relaxed = settings.model_copy(update={"min_new_labels": 0})
    runner = NoRunner()
    controller = Controller(relaxed, runner)
    decision = controller.step(Trigger(MANUAL, "try it"), dry_run=True)
    assert decision.run_id is not None
    assert controller.history.get(decision.run_id).state == "dry_run"
    assert decision.would_run
    assert not decision.run
    assert runner.started == []
    real = controller.step(Trigger(MANUAL, "now for real"))
    assert real.run
    assert runner.started == [real.run_id]
    controller.close()


def test_a_run_whose_process_died_is_marked_failed_once(settings: LoopSettings) -> None:
    controller = Controller(settings, NoRunner())
    run = controller.history.create("accuracy", "it fell", {}, RUNNING)
    controller.history.update(run, started_at=time.time() - STARTUP_GRACE_SECONDS - 5)
    young = controller.history.create("accuracy", "just started", {}, RUNNING)
    controller.history.update(young, started_at=time.time())
    assert controller.recover() == [run]
    record = controller.history.get(run)
    assert record.state == FAILED
    assert "interrupted" in (record.error or "")
    assert controller.history.get(young).state == RUNNING  # still starting: not touched
    assert controller.recover() == []
    controller.close()


def test_nothing_fires_without_evidence(settings: LoopSettings) -> None:
    controller = Controller(settings, NoRunner())
    decision = controller.step()
    assert decision == decision.__class__(False, None, "nothing fired")
    assert controller.history.recent() == []
    controller.close()


def test_a_dry_run_with_nothing_fired_would_not_run(settings: LoopSettings) -> None:
    controller = Controller(settings, NoRunner())
    decision = controller.step(None, dry_run=True)
    assert (decision.run, decision.would_run, decision.reason) == (False, False, "nothing fired")
    controller.close()
