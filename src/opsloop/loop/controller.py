"""The loop's policy: given what fired, the history and the limits, run now or not, and record it.

`Controller.step()` is one decision: gather the evidence, pick the most important trigger (or the
manual / alert one it was given), check the limits — no run in progress, the cooldown since the
last run, the runs per day, enough new labels — and either start the work through the runner or
say why not. A decision on an explicit request (manual, alert) is always recorded, a routine
poll only when it starts something. Before deciding it marks runs whose process died (their lock
is free but their row still says running) as failed, so a crash is on record and never run twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from opsloop.loop.history import DISPATCHED, DRY_RUN, FAILED, RUNNING, SKIPPED, History, RunLock
from opsloop.loop.runner import Runner, make_runner
from opsloop.loop.settings import LoopSettings
from opsloop.loop.triggers import (
    ALERT,
    MANUAL,
    PRIORITY,
    Evidence,
    Trigger,
    fired_triggers,
    gather_evidence,
)

logger = logging.getLogger(__name__)

DAY = 86_400.0
# A run's own process takes its lock within seconds of starting; until then a free lock does not
# mean its process died.
STARTUP_GRACE_SECONDS = 180.0


@dataclass(frozen=True)
class Decision:
    """Whether to run, on which trigger, and why."""

    run: bool
    trigger: Trigger | None
    reason: str
    run_id: int | None = None
    would_run: bool = False  # a dry run that found everything in place to run


def decide(
    trigger: Trigger,
    settings: LoopSettings,
    history: History,
    lock: RunLock,
    new_labels: int,
    now: float,
) -> tuple[bool, str]:
    """The limits, in order; (go, why)."""
    running = history.in_state(RUNNING)
    if running or lock.held_elsewhere():
        which = f" (run {running[0].id})" if running else ""
        return False, f"a run is in progress{which}; one at a time"
    last = history.last_started()
    if last is not None and last.started_at is not None:
        waited = now - last.started_at
        if waited < settings.cooldown_seconds:
            return False, (
                f"cooldown: the last run (run {last.id}) started {waited:.0f} s ago, less than "
                f"{settings.cooldown_seconds:g} s (OPSLOOP_LOOP_COOLDOWN_SECONDS)"
            )
    today = history.started_since(now - DAY)
    if today >= settings.max_runs_per_day:
        return False, (
            f"{today} runs in the last 24 h, the most allowed (OPSLOOP_LOOP_MAX_RUNS_PER_DAY)"
        )
    if new_labels < settings.min_new_labels:
        return False, (
            f"{new_labels} new labels since the last run, fewer than "
            f"{settings.min_new_labels} (OPSLOOP_LOOP_MIN_NEW_LABELS): nothing new to learn from"
        )
    return True, f"{trigger.kind}: {trigger.reason}"


class Controller:
    """Decides and starts loop runs; one per process, its state in the loop database."""

    def __init__(self, settings: LoopSettings, runner: Runner | None = None) -> None:
        self.settings = settings
        self.history = History(settings.resolved_db_url())
        self.lock = RunLock(settings.resolved_db_url())
        self.runner = runner or make_runner(settings)
        self.last_evidence: Evidence | None = None
        self.skipped = 0
        self._last_reason: str | None = None

    def recover(self, now: float | None = None) -> list[int]:
        """Mark runs whose process died mid-run as failed; their ids."""
        now = time.time() if now is None else now
        if self.runner.running() or self.lock.held_elsewhere():
            return []
        orphans = [
            run
            for run in self.history.in_state(RUNNING)
            if run.started_at is not None and now - run.started_at > STARTUP_GRACE_SECONDS
        ]
        for run in orphans:
            self.history.update(
                run.id,
                state=FAILED,
                finished_at=now,
                error="interrupted: its process died before it finished; the champion and the "
                "data are as they were",
            )
            logger.warning("loop run %d was interrupted (its process died); marked failed", run.id)
        return [run.id for run in orphans]

    def step(
        self, request: Trigger | None = None, *, dry_run: bool = False, wait: bool = False
    ) -> Decision:
        """One decision on `request` (manual or alert) or on what the evidence fires."""
        from opsloop.errors import PredictionLogError
        from opsloop.predictions import count_labels

        now = time.time()
        self.recover(now)
        evidence = gather_evidence(self.settings)
        self.last_evidence = evidence
        triggers = (
            [request]
            if request is not None
            else fired_triggers(evidence, self.settings, self.history, now)
        )
        if not triggers:
            return Decision(False, None, "nothing fired")
        trigger = min(triggers, key=lambda t: PRIORITY.index(t.kind))
        last = self.history.last_started()
        since = None if last is None else last.started_at
        try:
            new_labels = count_labels(self.settings.resolved_predlog_url(), since=since)
        except PredictionLogError as exc:  # no log yet: nothing to learn from
            logger.debug("no labels to count: %s", exc)
            new_labels = 0
        go, reason = decide(trigger, self.settings, self.history, self.lock, new_labels, now)
        evidence_record = {
            **trigger.evidence,
            "new_labels": new_labels,
            "base_hash": evidence.base_hash,
        }
        explicit = trigger.kind in (MANUAL, ALERT)
        if not go or dry_run:
            state = DRY_RUN if go else SKIPPED
            self.skipped += not go
            # Said once per new reason: a cooldown would otherwise repeat it every interval.
            level = logging.DEBUG if reason == self._last_reason else logging.INFO
            self._last_reason = reason
            logger.log(level, "loop: %s (%s)", "would run" if go else "not running", reason)
            run_id = None
            if explicit or dry_run:
                run_id = self.history.create(trigger.kind, reason, evidence_record, state)
                self.history.update(run_id, finished_at=now, base_hash=evidence.base_hash)
            return Decision(False, trigger, reason, run_id, would_run=go)
        return self.launch(trigger, reason, evidence_record, evidence.base_hash, wait=wait)

    def launch(
        self,
        trigger: Trigger,
        reason: str,
        evidence: dict[str, object],
        base_hash: str | None,
        *,
        wait: bool,
    ) -> Decision:
        remote = self.runner.name != "process"
        run_id = self.history.create(
            trigger.kind, reason, evidence, DISPATCHED if remote else RUNNING
        )
        self.history.update(
            run_id, started_at=time.time(), runner=self.runner.name, base_hash=base_hash
        )
        logger.info("loop run %d (%s): %s", run_id, trigger.kind, reason)
        try:
            self.runner.start(run_id)
        except Exception as exc:
            self.history.update(run_id, state=FAILED, finished_at=time.time(), error=str(exc))
            raise
        if wait:
            self.runner.wait()
        return Decision(True, trigger, reason, run_id)

    def close(self) -> None:
        self.history.dispose()
