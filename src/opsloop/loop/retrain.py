"""One loop run's work: `opsloop loop retrain --run N`, wherever the runner starts it.

Holding the loop's lock, it builds a new data version (the base dataset plus the labelled
production examples, the newest held out), trains, evaluates, registers and exports a challenger
on it with the existing pipeline stages, and gates it: better than the champion on the held-out
recent production slice by at least `min_improvement`, and not worse than `base_margin` on the
base dataset's original test split. Only a promoted run touches anything shared: the champion
alias moves (servers following it hot-swap), the champion's bundle is materialised for the
monitor, and the data version is copied into place and versioned with DVC. Everything else stays
in the run's scratch directory, so a failed, refused or killed run leaves champion and data as
they were; every step is written to the run's row as it happens.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from opsloop.errors import OpsloopError, first_line
from opsloop.loop.history import (
    FAILED,
    REFUSED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    History,
    RunLock,
    RunRecord,
    this_host,
)
from opsloop.loop.settings import LoopSettings

if TYPE_CHECKING:
    from opsloop.config import OpsloopConfig
    from opsloop.registry.gate import PromotionDecision

logger = logging.getLogger(__name__)


def retrain(settings: LoopSettings, run_id: int) -> RunRecord:
    """Do run `run_id` under the lock and record how it ended; returns its final row."""
    history = History(settings.resolved_db_url())
    lock = RunLock(settings.resolved_db_url())
    if not lock.acquire():
        history.update(
            run_id,
            state=SKIPPED,
            finished_at=time.time(),
            error="another loop run holds the lock; this one did nothing",
        )
        return history.get(run_id)
    host, pid = this_host()
    record = history.get(run_id)
    history.update(
        run_id, state=RUNNING, started_at=record.started_at or time.time(), host=host, pid=pid
    )
    scratch = settings.workspace / ".opsloop" / "loop" / f"run-{run_id}"
    try:
        final = _work(settings, history, run_id, scratch, record.trigger)
    except BaseException as exc:  # recorded, then raised: a KeyboardInterrupt is a failure too
        history.update(run_id, state=FAILED, finished_at=time.time(), error=first_line(exc)[:2000])
        logger.error("loop run %d failed: %s", run_id, first_line(exc))
        raise
    finally:
        lock.release()
        shutil.rmtree(scratch, ignore_errors=True)
        history.dispose()
    return final


def _work(
    settings: LoopSettings, history: History, run_id: int, scratch: Path, trigger: str
) -> RunRecord:
    from opsloop.config import load_config
    from opsloop.data import prepare_dataset, read_manifest
    from opsloop.pipeline import run_pipeline
    from opsloop.registry import CHAMPION, get_version
    from opsloop.tracking import resolve_tracking_uri

    base_cfg = load_config(["data=production", *settings.override_list])
    base_dir = base_cfg.data.base_dir or base_cfg.data.processed_dir
    cfg = load_config(
        [
            "data=production",
            *settings.override_list,
            f"workspace={settings.workspace}",
            f"registry.model_name={settings.model_name}",
            f"data.processed_dir={scratch / 'data'}",
            f"data.base_dir={base_dir}",
            f"data.predlog_url={settings.resolved_predlog_url()}",
            # Pinned: the pipeline prepares the data again, and labels keep arriving meanwhile;
            # the version recorded must be the one trained on.
            f"data.labels_until={time.time()}",
            f"+logger.tags.loop_run={run_id}",
            f"+logger.tags.loop_trigger={trigger}",
        ]
    )
    uri = resolve_tracking_uri(cfg.logger, settings.workspace)
    base_manifest = read_manifest(Path(base_dir) / (cfg.data.base or ""))
    data = prepare_dataset(cfg.data)
    base_count = base_manifest.counts["train"] + base_manifest.counts["val"]
    labels = sum(data.counts.values()) - base_count
    history.update(
        run_id,
        base_hash=base_manifest.content_hash,
        data_name=data.name,
        data_hash=data.content_hash,
        labels=labels,
        champion_before=get_version(f"{settings.model_name}@{CHAMPION}", uri).version,
    )
    trained = run_pipeline(cfg, promote=False, outputs=scratch / "outputs")
    history.update(run_id, mlflow_run_id=trained.run_id, model_version=trained.model_version)
    decision = gate(settings, cfg, base_dir, trained.model_version, uri, run_id)
    outcome = {"decision": decision.reason, "promoted": decision.promoted}
    if not decision.promoted:
        history.update(run_id, state=REFUSED, finished_at=time.time(), **outcome)
        return history.get(run_id)
    note = publish(settings, cfg, data.path, uri)
    history.update(
        run_id,
        state=SUCCEEDED,
        finished_at=time.time(),
        decision=f"{decision.reason}; data: {note}",
        promoted=True,
    )
    return history.get(run_id)


def gate(
    settings: LoopSettings,
    cfg: OpsloopConfig,
    base_dir: str,
    version: str,
    tracking_uri: str,
    run_id: int,
) -> PromotionDecision:
    """The loop's gate: better on the recent production slice, not worse on the old test split.

    A negative accuracy margin on the primary holdout is how "better by at least
    `min_improvement`" is asked of the standard gate; the base dataset's test split is a guard.
    """
    from opsloop.registry.gate import Guard, promote_model
    from opsloop.workspace import Workspace

    registry = dataclasses.replace(cfg.registry, accuracy_margin=-settings.min_improvement)
    base = dataclasses.replace(
        cfg.data, name=cfg.data.base or cfg.data.name, processed_dir=base_dir
    )
    return promote_model(
        settings.model_name,
        registry,
        cfg.data,
        tracking_uri,
        cache_dir=Workspace(settings.workspace).bundle_cache,
        version=version,
        guards=[Guard(base, settings.base_margin)],
        by=f"opsloop loop run {run_id}",
    )


def publish(settings: LoopSettings, cfg: OpsloopConfig, dataset: Path, tracking_uri: str) -> str:
    """After a promotion: the champion's bundle where the monitor reads it, and the data version
    in the workspace's processed data, versioned with DVC when the workspace is a DVC project."""
    from opsloop.atomic import staged_directory
    from opsloop.config import load_config
    from opsloop.registry import CHAMPION, download_bundle
    from opsloop.workspace import Workspace

    workspace = Workspace(settings.workspace)
    served = workspace.served_bundle(cfg.registry.bundle_dir, settings.model_name)
    download_bundle(f"{settings.model_name}@{CHAMPION}", tracking_uri, served)
    canonical_root = Path(
        load_config(["data=production", *settings.override_list]).data.processed_dir
    )
    target = canonical_root / dataset.name
    with staged_directory(target) as staging:
        for item in dataset.iterdir():
            shutil.copy2(item, staging / item.name)
    return version_with_dvc(settings.workspace, target)


def version_with_dvc(workspace: Path, target: Path) -> str:
    """`dvc add` the data version and `dvc push` it to the default remote, when there is one."""
    if not (workspace / ".dvc").is_dir():
        return f"written to {target} (the workspace is not a DVC project: not versioned)"
    relative = target.resolve().relative_to(workspace.resolve())
    dvc = [sys.executable, "-m", "dvc"]
    added = _run([*dvc, "add", "--quiet", str(relative)], workspace)
    if added is not None:
        raise OpsloopError(f"dvc add {relative} failed: {added}")
    remote = subprocess.run(
        [*dvc, "remote", "default"], cwd=workspace, capture_output=True, text=True, check=False
    ).stdout.strip()
    if not remote:
        return f"{relative} tracked with DVC ({relative}.dvc); no default remote to push to"
    pushed = _run([*dvc, "push", "--quiet", f"{relative}.dvc"], workspace)
    if pushed is not None:
        raise OpsloopError(f"dvc push of {relative} to '{remote}' failed: {pushed}")
    return f"{relative} tracked with DVC ({relative}.dvc) and pushed to '{remote}'"


def _run(command: list[str], cwd: Path) -> str | None:
    """None when the command succeeded, else its first line of output."""
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode == 0:
        return None
    return (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[0]
