"""What the pages show, read from opsloop's stores into plain rows: no Streamlit here.

- the registry (MLflow): versions with aliases, metrics and lineage, the champion/challenger
  comparison and the promotion history with every gate decision (`read_models`)
- the prediction log: recent answers with their labels (`read_log`), online and estimated
  accuracy over time, drift p-values per detector over time, low-confidence answers first
- the loop database: its runs, merged with the registry's promotions and rollbacks into one
  timeline (`read_loop_runs`, `loop_timeline`)
- the bundle's reference sample: held-out images with their true labels to try the model on

A store that does not exist yet is a `NoDataError` whose message says which command makes it; a
store that exists but cannot be read is the store's own one-line `OpsloopError`.

Why one file of ~750 lines: it is the UI's whole read side, kept torch-free and apart from
Streamlit so it is unit tested without a browser; each page's loader is small and they share
the store opening and the `NoDataError` messages here. Split it by page if it grows further.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from opsloop.errors import MissingExtraError, ModelNotFoundError, OpsloopError, redact_url
from opsloop.predictions import CHAMPION_ROLE, NO_LABEL, LoggedPredictions

if TYPE_CHECKING:
    from opsloop.loop.history import RunRecord
    from opsloop.monitor.estimate import AccuracyEstimator
    from opsloop.monitor.quality import QualityReport
    from opsloop.monitor.window import ReferenceData

logger = logging.getLogger(__name__)

# Metrics worth a column in the versions table, first found wins (evaluation, then training).
ACCURACY_KEYS = ("eval/accuracy", "test/acc")
# The lineage tags shown, in this order (a run records more: run directories, versions).
LINEAGE_KEYS = (
    "dataset_name",
    "dataset_hash",
    "config_hash",
    "git_commit",
    "git_dirty",
    "seed",
    "loop_run",
    "loop_trigger",
)
PREVIOUS = "previous"
MIN_DRIFT_SAMPLES = 30  # the monitor's default: smaller windows are not judged
ESTIMATE_WINDOW = 1000  # newest answers per version the table's estimate covers


class NoDataError(OpsloopError):
    """A store the page reads does not exist yet; the message says what to run to make it."""


def sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///` URL (None for any other database or an in-memory one)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def require_store(url: str, what: str, hint: str) -> None:
    """A `NoDataError` when `url` is a SQLite file that does not exist yet.

    Checked before opening: SQLite (and MLflow on it) would create an empty database, and the
    page would then say "nothing there" about a path the user never meant.
    """
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise NoDataError(f"no {what} yet (no {path}); {hint}")


def iso(timestamp: float) -> str:
    """Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC, for tables."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    """One registered version, as the versions table shows it."""

    version: str
    aliases: tuple[str, ...]
    created_at: str
    run_id: str | None
    accuracy: float | None
    decision: str | None  # the gate's last word on it: promoted, refused, rolled_back
    reason: str | None
    dataset_hash: str | None
    git_commit: str | None


@dataclass(frozen=True)
class VersionDetail:
    """One version's metrics and lineage, for the champion/challenger comparison."""

    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    metrics: dict[str, float]
    lineage: dict[str, str]


@dataclass(frozen=True)
class PromotionEvent:
    """One entry of the registry's promotion history: a gate decision or a rollback."""

    at: str
    kind: str  # "promotion" or "rollback"
    version: str  # the challenger judged, or the version a rollback restored
    champion_version: str | None
    promoted: bool
    forced: bool
    reason: str
    challenger_accuracy: float | None
    champion_accuracy: float | None
    latency_ms: float | None
    holdout: str
    by: str

    @property
    def verdict(self) -> str:
        if self.kind == "rollback":
            return "rolled back"
        if self.forced:
            return "forced"
        return "promoted" if self.promoted else "refused"

    @property
    def timestamp(self) -> float:
        try:
            return datetime.fromisoformat(self.at).timestamp()
        except ValueError:
            return 0.0


@dataclass(frozen=True)
class ModelsView:
    """Everything the Models page shows about one registered model."""

    name: str
    tracking_uri: str  # redacted
    versions: list[VersionRow]
    champion: VersionDetail | None
    challenger: VersionDetail | None
    previous: VersionDetail | None  # the champion the current one replaced, if any
    history: list[PromotionEvent]  # newest first


def registry_hint(model_name: str) -> str:
    return (
        f"run `make run` (or `opsloop pipeline`) to train, register and promote a first "
        f"{model_name}"
    )


def read_models(tracking_uri: str, model_name: str) -> ModelsView:
    """The versions, the champion and challenger, and the promotion history of `model_name`."""
    require_store(tracking_uri, "model registry", registry_hint(model_name))
    try:
        import mlflow  # noqa: F401  (only to say clearly that it is missing)
    except ImportError as exc:
        raise MissingExtraError("the Models page", "ui", "mlflow") from exc
    from opsloop.registry import (
        CHALLENGER,
        CHAMPION,
        describe_model,
        list_versions,
        promotion_history,
    )

    try:
        versions = list_versions(model_name, tracking_uri)
    except ModelNotFoundError as exc:
        raise NoDataError(f"{exc}; or {registry_hint(model_name)}") from exc
    events = [promotion_event(e) for e in promotion_history(model_name, tracking_uri)]
    holders = {
        alias: next((v for v in versions if alias in v.aliases), None)
        for alias in (CHAMPION, CHALLENGER)
    }
    champion = holders[CHAMPION]
    # The champion the current one replaced: what it is compared with once no challenger is left.
    replaced = next(
        (
            e.champion_version
            for e in reversed(events)
            if champion is not None and e.promoted and e.version == champion.version
        ),
        None,
    )
    previous = next((v for v in versions if v.version == replaced), None)
    details: dict[str, VersionDetail] = {}
    for role, holder in (*holders.items(), (PREVIOUS, previous)):
        if holder is not None:
            described = describe_model(f"{model_name}/{holder.version}", tracking_uri)
            details[role] = VersionDetail(
                version=holder.version,
                aliases=tuple(holder.aliases),
                run_id=holder.run_id,
                metrics=described.metrics,
                lineage=described.lineage,
            )
    rows = [
        VersionRow(
            version=info.version,
            aliases=tuple(info.aliases),
            created_at=info.created_at.replace("T", " ").split("+")[0],
            run_id=info.run_id,
            accuracy=version_accuracy(details, info.version, info.tags),
            decision=info.tags.get("promotion.decision"),
            reason=info.tags.get("promotion.reason"),
            dataset_hash=info.tags.get("dataset_hash"),
            git_commit=info.tags.get("git_commit"),
        )
        for info in versions
    ]
    return ModelsView(
        name=model_name,
        tracking_uri=redact_url(tracking_uri),
        versions=rows,
        champion=details.get(CHAMPION),
        challenger=details.get(CHALLENGER),
        previous=details.get(PREVIOUS),
        history=list(reversed(events)),
    )


def version_accuracy(
    details: dict[str, VersionDetail], version: str, tags: dict[str, str]
) -> float | None:
    """The version's holdout accuracy: its run's metric when read, else the gate's tag."""
    for detail in details.values():
        if detail.version == version:
            found = first_metric(detail.metrics, ACCURACY_KEYS)
            if found is not None:
                return found
    tagged = tags.get("promotion.challenger_accuracy")
    return float(tagged) if tagged else None


def first_metric(metrics: dict[str, float], keys: Sequence[str]) -> float | None:
    return next((metrics[key] for key in keys if key in metrics), None)


def promotion_event(raw: dict[str, Any]) -> PromotionEvent:
    """A history entry as the gate stored it (`PromotionDecision` as a dict), tolerantly."""

    def number(key: str) -> float | None:
        value = raw.get(key)
        return None if value is None else float(value)

    return PromotionEvent(
        at=str(raw.get("at", "")),
        kind=str(raw.get("kind", "promotion")),
        version=str(raw.get("challenger_version", "?")),
        champion_version=raw.get("champion_version"),
        promoted=bool(raw.get("promoted")),
        forced=bool(raw.get("forced")),
        reason=str(raw.get("reason", "")),
        challenger_accuracy=number("challenger_accuracy"),
        champion_accuracy=number("champion_accuracy"),
        latency_ms=number("challenger_latency_ms"),
        holdout=str(raw.get("holdout", "")),
        by=str(raw.get("by", "")),
    )


def compare_versions(
    champion: VersionDetail, challenger: VersionDetail
) -> list[tuple[str, float | None, float | None]]:
    """(metric, champion's, challenger's) for every metric either has, evaluation first."""
    names = sorted(set(champion.metrics) | set(challenger.metrics))
    names.sort(key=lambda name: (not name.startswith(("eval/", "test/")), name))
    return [(n, champion.metrics.get(n), challenger.metrics.get(n)) for n in names]


# --- the prediction log ----------------------------------------------------------------------


LOG_HINT = (
    "start the server (`make ui` or `opsloop serve`) and send it traffic: the Predict page, "
    "or `opsloop simulate`"
)


def read_log(url: str, limit: int) -> LoggedPredictions:
    """The newest `limit` predictions with their labels, oldest first; `NoDataError` if none."""
    from opsloop.predictions import read_predictions

    require_store(url, "prediction log", LOG_HINT)
    logged = read_predictions(url, limit=limit)
    if len(logged) == 0:
        raise NoDataError(f"the prediction log {redact_url(url)} is empty; {LOG_HINT}")
    return logged


class VersionBundles:
    """Each model version's bundle, for its own drift reference and accuracy estimator: the
    served (workspace) bundle when it is that version, else the registry's bundle cache in the
    workspace, else downloaded from the registry into that cache. Each is looked up once."""

    def __init__(
        self, served: Path, model_name: str, tracking_uri: str | None, cache: Path
    ) -> None:
        self.served = served
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.cache = cache
        self._paths: dict[str, Path | None] = {}
        self._references: dict[str, ReferenceData | None] = {}
        self._estimators: dict[str, AccuracyEstimator | None] = {}

    @property
    def served_version(self) -> str | None:
        """The version of the served (workspace) bundle, None when there is none."""
        from opsloop.bundle import read_bundle_manifest

        try:
            return read_bundle_manifest(self.served).model_version
        except OpsloopError:
            return None

    def path(self, version: str) -> Path | None:
        """The bundle directory of `version`, or None when no copy can be found."""
        if version not in self._paths:
            self._paths[version] = self._find(version)
        return self._paths[version]

    def _find(self, version: str) -> Path | None:
        from opsloop.bundle import load_bundle

        if self.served_version == version:
            return self.served
        cached = self.cache / self.model_name / f"v{version}"
        try:
            return load_bundle(cached).path
        except OpsloopError:
            pass
        if self.tracking_uri is None:
            return None
        store = sqlite_file(self.tracking_uri)
        if store is not None and not store.is_file():
            return None  # no registry here: asking MLflow would create an empty one
        try:
            from opsloop.registry import cached_bundle, get_version

            info = get_version(f"{self.model_name}/{version}", self.tracking_uri)
            return cached_bundle(info, self.tracking_uri, self.cache).path
        except (OpsloopError, OSError, ImportError) as exc:
            logger.info("no bundle of v%s: %s", version, exc)
            return None

    def reference(self, version: str) -> ReferenceData | None:
        """`version`'s drift reference sample (None when its bundle cannot be found)."""
        if version not in self._references:
            from opsloop.monitor.window import load_reference

            path = self.path(version)
            self._references[version] = None if path is None else load_reference(path)
        return self._references[version]

    def estimator(self, version: str) -> AccuracyEstimator | None:
        """`version`'s label-free accuracy estimator (None without one)."""
        if version not in self._estimators:
            from opsloop.monitor.service import load_bundle_estimator

            path = self.path(version)
            self._estimators[version] = None if path is None else load_bundle_estimator(path)
        return self._estimators[version]


def assess_log(logged: LoggedPredictions, bundles: VersionBundles) -> QualityReport:
    """Online accuracy per version and role, and each champion version's label-free estimate
    over its newest answers (at most `ESTIMATE_WINDOW`, at least `MIN_DRIFT_SAMPLES`)."""
    from opsloop.monitor.estimate import METHOD
    from opsloop.monitor.quality import Estimate, assess_quality

    report = assess_quality(logged)
    estimates = []
    for version, rows in champion_rows(logged).items():
        estimator = bundles.estimator(version)
        newest = rows[-ESTIMATE_WINDOW:]
        if estimator is None or len(newest) < MIN_DRIFT_SAMPLES or not comparable(logged, newest):
            continue
        images = [logged.inputs[i] for i in newest]
        value = estimator.estimate(
            np.stack(images), logged.probabilities[newest], logged.embeddings[newest]
        )
        estimates.append(Estimate(version, value, len(newest), METHOD))
    return dataclasses.replace(report, estimates=estimates)


def comparable(logged: LoggedPredictions, rows: npt.NDArray[np.int64]) -> bool:
    """Whether `rows` can be judged together: one input shape, and embeddings of the log's
    current width (the read side leaves another model's wider or narrower ones as NaN)."""
    shapes = {logged.inputs[i].shape for i in rows}
    return len(shapes) == 1 and bool(np.isfinite(logged.embeddings[rows]).all())


def champion_rows(logged: LoggedPredictions) -> dict[str, npt.NDArray[np.int64]]:
    """The row indices of each version's champion answers, in log order."""
    rows: dict[str, list[int]] = {}
    for index, (version, role) in enumerate(zip(logged.model_versions, logged.roles, strict=True)):
        if role == CHAMPION_ROLE:
            rows.setdefault(version, []).append(index)
    return {version: np.array(found, dtype=np.int64) for version, found in rows.items()}


@dataclass(frozen=True)
class AccuracyPoint:
    """Accuracy of one version over one stretch of time: measured (labels) or estimated."""

    at: float  # the stretch's last answer, Unix seconds
    model_version: str
    kind: str  # "online" (labels joined) or "estimated" (no labels)
    accuracy: float
    count: int  # labelled answers (online) or answers (estimated) it is computed on

    @property
    def series(self) -> str:
        return f"v{self.model_version} {self.kind}"


def accuracy_over_time(
    logged: LoggedPredictions, *, chunk: int, bundles: VersionBundles | None = None
) -> list[AccuracyPoint]:
    """Per champion version, in time order: online accuracy over each `chunk` labelled answers,
    and, with `bundles`, the version's own estimate over each `chunk` of its answers."""
    points: list[AccuracyPoint] = []
    for version, rows in champion_rows(logged).items():
        labelled = rows[logged.labelled[rows]]
        for part in chunks(len(labelled), chunk):
            picked = labelled[part]
            right = logged.labels[picked] == logged.true_labels[picked]
            at = float(logged.created_at[picked[-1]])
            points.append(AccuracyPoint(at, version, "online", float(right.mean()), len(picked)))
        estimator = None if bundles is None else bundles.estimator(version)
        if estimator is None:
            continue
        for part in chunks(len(rows), chunk):
            picked = rows[part]
            if not comparable(logged, picked):
                continue
            images = [logged.inputs[i] for i in picked]
            value = estimator.estimate(
                np.stack(images), logged.probabilities[picked], logged.embeddings[picked]
            )
            at = float(logged.created_at[picked[-1]])
            points.append(AccuracyPoint(at, version, "estimated", value, len(picked)))
    return sorted(points, key=lambda p: p.at)


def chunks(count: int, size: int, minimum: int | None = None) -> list[npt.NDArray[np.int64]]:
    """Consecutive index ranges of `size` over `count` rows; a last, shorter one is kept when it
    has at least `minimum` rows (default: half a chunk), so the newest answers are not hidden."""
    least = max(1, size // 2) if minimum is None else minimum
    starts = range(0, count, size)
    ranges = [np.arange(s, min(s + size, count), dtype=np.int64) for s in starts]
    return [r for r in ranges if len(r) == size or len(r) >= least]


@dataclass(frozen=True)
class DriftPoint:
    """One detector's verdict on one window of champion answers."""

    at: float  # the window's last answer, Unix seconds
    detector: str
    p_value: float  # the smallest corrected p-value of its features
    drift: bool
    window_size: int
    model_version: str


def drift_over_time(
    logged: LoggedPredictions, bundles: VersionBundles, *, window: int, alpha: float
) -> list[DriftPoint]:
    """Each detector's corrected p-value on consecutive windows of `window` champion answers of
    one version, against that version's own reference, as `opsloop monitor` judges a window.

    Shadow and canary answers are left out (another model's outputs), and no window spans two
    versions: each model's embeddings and outputs are only comparable with its own reference.
    """
    from opsloop.monitor.report import detect_drift
    from opsloop.monitor.window import Window

    points: list[DriftPoint] = []
    for version, rows in champion_runs(logged):
        reference = bundles.reference(version)
        if reference is None:
            logger.info("no reference bundle for v%s: its windows are not judged", version)
            continue
        for part in chunks(len(rows), window, minimum=MIN_DRIFT_SAMPLES):
            picked = rows[part]
            if not comparable(logged, picked):
                continue
            images = [logged.inputs[i] for i in picked]
            current = Window(
                images=np.stack(images),
                probabilities=logged.probabilities[picked],
                embeddings=logged.embeddings[picked],
                model_versions=[version] * len(picked),
                created_at=logged.created_at[picked],
            )
            at = float(logged.created_at[picked[-1]])
            try:
                report = detect_drift(
                    reference, current, alpha=alpha, min_samples=MIN_DRIFT_SAMPLES
                )
            except OpsloopError as exc:  # e.g. inputs of another shape than the reference's
                logger.info("window ending %s not judged: %s", iso(at), exc)
                continue
            points.extend(
                DriftPoint(at, d.name, d.p_value, d.drift, len(picked), version)
                for d in report.detectors
            )
    return sorted(points, key=lambda p: p.at)


def champion_runs(logged: LoggedPredictions) -> list[tuple[str, npt.NDArray[np.int64]]]:
    """Champion answers split into consecutive runs of one version (a swap starts a new run)."""
    runs: list[tuple[str, list[int]]] = []
    for index, (version, role) in enumerate(zip(logged.model_versions, logged.roles, strict=True)):
        if role != CHAMPION_ROLE:
            continue
        if not runs or runs[-1][0] != version:
            runs.append((version, []))
        runs[-1][1].append(index)
    return [(version, np.array(rows, dtype=np.int64)) for version, rows in runs]


@dataclass(frozen=True)
class RecentAnswer:
    """One logged answer, for the gallery of recent predictions."""

    request_id: str
    item: int
    created_at: float
    model_version: str
    role: str
    label: int
    confidence: float
    true_label: int | None
    image: npt.NDArray[np.uint8]  # (H, W) grey levels, 0..255

    @property
    def wrong(self) -> bool | None:
        return None if self.true_label is None else self.true_label != self.label


def least_confident(
    logged: LoggedPredictions, count: int, pixel_max: float = 16.0
) -> list[RecentAnswer]:
    """The `count` answers the model was least sure of, least first (where to look for bugs
    and what to label)."""
    confidence = logged.probabilities.max(axis=1) if len(logged) else np.zeros(0)
    order = np.argsort(confidence, kind="stable")[:count]
    return [
        RecentAnswer(
            request_id=logged.request_ids[i],
            item=int(logged.items[i]),
            created_at=float(logged.created_at[i]),
            model_version=logged.model_versions[i],
            role=logged.roles[i],
            label=int(logged.labels[i]),
            confidence=float(confidence[i]),
            true_label=None if logged.true_labels[i] == NO_LABEL else int(logged.true_labels[i]),
            image=grey_image(logged.inputs[i], pixel_max),
        )
        for i in order
    ]


def grey_image(pixels: npt.NDArray[Any], pixel_max: float, scale: int = 8) -> npt.NDArray[np.uint8]:
    """A (C, H, W) input on 0..pixel_max as an (H*scale, W*scale) grey image, upscaled by
    repeating pixels so an 8x8 digit stays sharp on screen."""
    grey = np.asarray(pixels, dtype=np.float32).reshape(-1, *pixels.shape[-2:]).mean(axis=0)
    scaled = np.clip(grey * (255.0 / pixel_max), 0, 255).astype(np.uint8)
    return np.kron(scaled, np.ones((scale, scale), dtype=np.uint8))


# --- samples to try the model on ---------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """Held-out images from the bundle's reference sample, with their true labels."""

    images: npt.NDArray[Any]  # (N, C, H, W) on the model's pixel scale
    labels: npt.NDArray[np.int64]
    pixel_max: float
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def read_samples(bundle_path: Path, count: int = 10) -> Samples:
    """`count` reference images, one class after another, so every class is there to try."""
    from opsloop.bundle import load_bundle

    if not bundle_path.is_dir():
        raise NoDataError(
            f"no bundle at {bundle_path} to take sample digits from; run `make run` (or set "
            "OPSLOOP_UI_BUNDLE_PATH), or upload an image instead"
        )
    bundle = load_bundle(bundle_path)
    arrays = bundle.load_reference()
    if "labels" not in arrays:
        raise NoDataError(f"bundle {bundle_path} has no labelled reference sample; re-export it")
    labels = arrays["labels"].astype(np.int64)
    picked = round_robin(labels, count)
    return Samples(
        images=arrays["images"][picked],
        labels=labels[picked],
        pixel_max=bundle.manifest.preprocessing.pixel_max,
        class_names=tuple(bundle.manifest.class_names),
    )


def round_robin(labels: npt.NDArray[np.int64], count: int) -> npt.NDArray[np.int64]:
    """Indices of up to `count` rows taking each class in turn, first occurrences first."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < count and any(by_class):
        for rows in by_class:
            if rows and len(picked) < count:
                picked.append(int(rows.pop(0)))
    return np.array(picked, dtype=np.int64)


# --- the loop --------------------------------------------------------------------------------


LOOP_HINT = (
    "take a first decision with `opsloop loop run --once` (add --dry-run to only record it), "
    "or start the controller with `opsloop loop serve`"
)


def read_loop_runs(url: str, limit: int = 100) -> list[RunRecord]:
    """The loop's newest runs, newest first; `NoDataError` when it never ran."""
    from opsloop.loop.history import History

    require_store(url, "loop history", LOOP_HINT)
    history = History(url)
    try:
        runs = history.recent(limit)
    finally:
        history.dispose()
    if not runs:
        raise NoDataError(f"the loop history {redact_url(url)} has no runs yet; {LOOP_HINT}")
    return runs


@dataclass(frozen=True)
class TimelineEvent:
    """One thing that happened in the loop, for the timeline."""

    at: float
    kind: str  # trigger, data, gate, promotion, rollback, failure
    title: str
    detail: str = ""
    run_id: int | None = None


def loop_timeline(
    runs: Sequence[RunRecord], promotions: Sequence[PromotionEvent] = ()
) -> list[TimelineEvent]:
    """Runs (trigger, data version, gate decision, failure) and the registry's promotions and
    rollbacks, oldest first. Promotions the loop made appear once: as its run's gate decision."""
    events: list[TimelineEvent] = []
    for run in runs:
        events.extend(run_events(run))
    by_loop = {run.model_version for run in runs if run.promoted}
    for event in promotions:
        if event.kind == "promotion" and event.promoted and event.version in by_loop:
            continue
        if event.kind == "promotion" and not event.promoted:
            continue  # a refusal outside the loop changed nothing
        kind = "rollback" if event.kind == "rollback" else "promotion"
        title = (
            f"champion rolled back to v{event.version} (from v{event.champion_version})"
            if kind == "rollback"
            else f"v{event.version} promoted to champion" + (" (forced)" if event.forced else "")
        )
        events.append(TimelineEvent(event.timestamp, kind, title, event.reason))
    return sorted(events, key=lambda e: (e.at, e.run_id or 0))


def run_events(run: RunRecord) -> list[TimelineEvent]:
    """One loop run as the events it went through."""
    events = [
        TimelineEvent(
            run.created_at,
            "trigger",
            f"run {run.id}: {run.trigger} -> {run.state}",
            run.reason,
            run.id,
        )
    ]
    done = run.finished_at or run.started_at or run.created_at
    if run.data_hash:
        events.append(
            TimelineEvent(
                run.started_at or run.created_at,
                "data",
                f"run {run.id}: data {run.data_name} {run.data_hash[:12]}",
                f"{run.labels or 0} labelled production examples",
                run.id,
            )
        )
    if run.decision:
        verdict = "promoted" if run.promoted else "refused"
        version = f"v{run.model_version}" if run.model_version else "the new model"
        events.append(
            TimelineEvent(
                done,
                "promotion" if run.promoted else "gate",
                f"run {run.id}: gate {verdict} {version}",
                run.decision,
                run.id,
            )
        )
    if run.error:
        events.append(TimelineEvent(done, "failure", f"run {run.id} failed", run.error, run.id))
    return events
