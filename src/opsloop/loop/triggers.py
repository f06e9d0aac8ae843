"""What can start a loop run, and the evidence each trigger is recorded with.

`gather_evidence(settings)` reads how the champion is doing — from the monitor's `/quality` and
`/drift` when `OPSLOOP_LOOP_MONITOR_URL` is set, else straight from the prediction log and the
champion's bundle (so the loop works without a monitor and without Prometheus) — and
`fired_triggers(...)` turns it into triggers: an online-accuracy drop, an estimated-accuracy drop,
drift (only with `act_on_drift`: drift explains, accuracy decides), a new version of the base
dataset, a schedule. Manual requests and Alertmanager webhooks arrive as triggers of their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from opsloop.errors import OpsloopError, first_line
from opsloop.loop.history import History
from opsloop.loop.settings import LoopSettings

logger = logging.getLogger(__name__)

# Trigger kinds, in the order the controller prefers them when several fire at once.
MANUAL, ALERT, ACCURACY, ESTIMATE, DATA, DRIFT, SCHEDULE = (
    "manual",
    "alert",
    "accuracy",
    "estimate",
    "data",
    "drift",
    "schedule",
)
PRIORITY = (MANUAL, ALERT, ACCURACY, ESTIMATE, DATA, DRIFT, SCHEDULE)


@dataclass(frozen=True)
class Trigger:
    """A reason to run, with the evidence it was decided on."""

    kind: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evidence:
    """How the champion is doing, as the loop sees it at one moment."""

    source: str  # "monitor" or "log"
    champion_version: str | None
    reference_accuracy: float | None  # the champion bundle's test-split accuracy
    accuracy: float | None  # online, on labelled answers
    accuracy_upper: float | None  # the upper end of its 95% interval
    labelled: int
    estimate: float | None  # label-free
    drift: bool | None
    drift_fired: list[str]
    base_hash: str | None  # the base dataset's content hash now

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gather_evidence(settings: LoopSettings) -> Evidence:
    """The champion's quality from the monitor, else from the log; never raises for a missing
    source (what cannot be read is None in the evidence, and logged)."""
    bundle = served_bundle(settings)
    reference = bundle_accuracy(bundle)
    base_hash = base_dataset_hash(settings)
    if settings.monitor_url:
        try:
            return from_monitor(settings.monitor_url, reference, base_hash)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            logger.warning("cannot read the monitor at %s: %s", settings.monitor_url, exc)
    return from_log(settings, bundle, reference, base_hash)


def from_monitor(url: str, reference: float | None, base_hash: str | None) -> Evidence:
    """The monitor's latest `/quality` and `/drift` verdicts."""
    base = url.rstrip("/")
    quality = httpx.get(f"{base}/quality", timeout=10)
    drift = httpx.get(f"{base}/drift", timeout=10)
    document = quality.json() if quality.status_code == 200 else {"versions": [], "estimates": []}
    report = drift.json() if drift.status_code == 200 else None
    champions = [v for v in document["versions"] if v["role"] == "champion"]
    champion = max(champions, key=lambda v: v["last_at"], default=None)
    accuracy = None if champion is None else champion.get("accuracy")
    estimates = {e["model_version"]: e["value"] for e in document.get("estimates", [])}
    version = None if champion is None else champion["model_version"]
    return Evidence(
        source="monitor",
        champion_version=version,
        reference_accuracy=reference,
        accuracy=None if not accuracy else accuracy["successes"] / accuracy["trials"],
        accuracy_upper=None if not accuracy else accuracy["upper"],
        labelled=0 if champion is None else int(champion["labelled"]),
        estimate=estimates.get(version) if version else None,
        drift=None if report is None else bool(report["drift"]),
        drift_fired=[] if report is None else list(report.get("fired", [])),
        base_hash=base_hash,
    )


def from_log(
    settings: LoopSettings, bundle: Path | None, reference: float | None, base_hash: str | None
) -> Evidence:
    """Online accuracy, the estimate and drift computed here from the log and the bundle."""
    from opsloop.monitor.service import check_once, quality_once

    url = settings.resolved_predlog_url()
    accuracy = upper = estimate = None
    labelled = 0
    version = None
    drift: bool | None = None
    fired: list[str] = []
    if bundle is not None:
        try:
            quality = quality_once(bundle, url, last=1000)
            champions = [q for q in quality.versions if q.role == "champion"]
            newest = max(champions, key=lambda q: q.last_at, default=None)
            if newest is not None:
                version, labelled = newest.model_version, newest.labelled
                if newest.accuracy is not None:
                    accuracy, upper = newest.accuracy.value, newest.accuracy.upper
            estimate = next(
                (e.value for e in quality.estimates if e.model_version == version), None
            )
            report = check_once(bundle, url)
            drift, fired = report.drift, report.fired
        except OpsloopError as exc:
            logger.debug("no evidence from the log yet: %s", first_line(exc))
    return Evidence(
        "log", version, reference, accuracy, upper, labelled, estimate, drift, fired, base_hash
    )


def fired_triggers(
    evidence: Evidence, settings: LoopSettings, history: History, now: float | None = None
) -> list[Trigger]:
    """Every trigger the evidence fires, in `PRIORITY` order."""
    now = time.time() if now is None else now
    triggers = []
    facts = evidence.as_dict()
    reference = settings.target_accuracy or evidence.reference_accuracy
    if (
        reference is not None
        and evidence.accuracy_upper is not None
        and evidence.labelled >= settings.min_accuracy_labels
        and evidence.accuracy_upper < reference - settings.accuracy_drop
    ):
        triggers.append(
            Trigger(
                ACCURACY,
                f"online accuracy {evidence.accuracy:.3f} (95% upper "
                f"{evidence.accuracy_upper:.3f}) on {evidence.labelled} labels, below the expected "
                f"{reference:.3f} by more than {settings.accuracy_drop:.2f}",
                facts,
            )
        )
    if (
        reference is not None
        and evidence.estimate is not None
        and evidence.estimate < reference - settings.estimate_drop
    ):
        triggers.append(
            Trigger(
                ESTIMATE,
                f"estimated accuracy {evidence.estimate:.3f} (no labels needed), below the "
                f"expected {reference:.3f} by more than {settings.estimate_drop:.2f}",
                facts,
            )
        )
    last = history.last_started()
    if last is not None and evidence.base_hash and last.base_hash not in (None, evidence.base_hash):
        triggers.append(
            Trigger(
                DATA,
                f"the base dataset changed: {last.base_hash[:12]} -> {evidence.base_hash[:12]}",
                facts,
            )
        )
    if settings.act_on_drift and evidence.drift:
        fired = ", ".join(evidence.drift_fired) or "?"
        triggers.append(Trigger(DRIFT, f"drift detected ({fired})", facts))
    if settings.schedule_seconds is not None and (
        last is None
        or last.started_at is None
        or now - last.started_at >= settings.schedule_seconds
    ):
        triggers.append(
            Trigger(SCHEDULE, f"scheduled every {settings.schedule_seconds:g} s", facts)
        )
    return triggers


def served_bundle(settings: LoopSettings) -> Path | None:
    """The champion's bundle the pipeline materialises in the workspace, if it is there."""
    from opsloop.config import load_config
    from opsloop.workspace import Workspace

    cfg = load_config(settings.override_list)
    path = Workspace(settings.workspace).served_bundle(cfg.registry.bundle_dir, settings.model_name)
    return path if (path / "bundle.json").is_file() else None


def bundle_accuracy(bundle: Path | None) -> float | None:
    """The test-split accuracy the bundle records (what an accuracy drop is measured against)."""
    if bundle is None:
        return None
    from opsloop.monitor.service import reference_accuracy

    return reference_accuracy(bundle)


def base_dataset_hash(settings: LoopSettings) -> str | None:
    """The content hash of the base dataset production data extends, if it is prepared."""
    from opsloop.config import load_config
    from opsloop.data import read_manifest

    cfg = load_config(["data=production", *settings.override_list])
    path = Path(cfg.data.base_dir or cfg.data.processed_dir) / (cfg.data.base or "")
    if not cfg.data.base or not (path / "manifest.json").is_file():
        return None
    try:
        return read_manifest(path).content_hash
    except OpsloopError:
        return None
