"""The monitoring service: `opsloop monitor serve` re-checks drift every few seconds.

Every `OPSLOOP_MONITOR_INTERVAL_SECONDS` it reads the last `OPSLOOP_MONITOR_WINDOW` predictions of
the prediction log, runs `detect_drift` against the bundle's reference sample and publishes the
verdict: Prometheus gauges on `/metrics`, the latest report as JSON on `GET /drift` and Evidently's
HTML report on `GET /drift/report`. A window that is too small, a log that cannot be opened or a
bundle without reference data never stops it: it keeps the last good verdict, reports its own
health on `/metrics` and `/drift`, and tries again at the next interval.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsloop.bundle import BUNDLE_JSON
from opsloop.errors import (
    EmptyWindowError,
    OpsloopError,
    PredictionLogError,
)
from opsloop.monitor.estimate import ESTIMATOR_FILE, AccuracyEstimator, load_estimator
from opsloop.monitor.evidently_report import write_html_report
from opsloop.monitor.metrics import MonitorMetrics
from opsloop.monitor.quality import QualityReport, assess_quality
from opsloop.monitor.report import DEFAULT_MIN_SAMPLES, DriftReport, detect_drift
from opsloop.monitor.settings import DEFAULT_WINDOW, ENV_PREFIX, MonitorSettings
from opsloop.monitor.watch import RollbackWatch, Verdict, WatchRules
from opsloop.monitor.window import ReferenceData, Window, load_reference, window_from_log
from opsloop.predictions import LoggedPredictions, default_log_url, read_predictions

logger = logging.getLogger(__name__)


class CheckFailedError(OpsloopError):
    """A drift check could not run; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str, window_size: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.window_size = window_size


@dataclass(frozen=True)
class CheckResult:
    """The last successful check: its report and the window it judged (for the HTML report)."""

    number: int
    report: DriftReport
    window: Window
    reference: ReferenceData


class DriftMonitor:
    """Runs checks and keeps the last verdict and the service's health; thread-safe."""

    def __init__(self, settings: MonitorSettings, bundle_path: Path, predlog_url: str) -> None:
        self.settings = settings
        self.bundle_path = bundle_path
        self.predlog_url = predlog_url
        self.metrics = MonitorMetrics()
        self.metrics.set("min_samples", settings.min_samples)
        self.reference: ReferenceData | None = None
        self._reference_stamp: int | None = None
        self.latest: CheckResult | None = None
        self.checks = 0
        self.last_error: str | None = None
        self.last_reason: str | None = None
        self.last_check_at: float | None = None
        self._lock = threading.Lock()
        self._html_lock = threading.Lock()
        self._html: tuple[int, Path] | None = None
        self._report_dir = settings.report_dir
        self.quality: QualityReport | None = None
        self.quality_error: str | None = None
        self.estimator: AccuracyEstimator | None = None
        self.watch = make_watch(settings)
        self.last_verdict: Verdict | None = None

    def run_once(self) -> None:
        """One round: the drift check, online quality and estimates, then the rollback watch."""
        self.check()
        window = self.check_quality()
        if window is not None and self.watch is not None:
            try:
                verdict = self.watch.step(window)
            except OpsloopError as exc:  # the registry is down: try again next round
                logger.warning("rollback watch skipped: %s", exc)
                return
            if verdict is not None:
                self.last_verdict = verdict
                if verdict.rollback:
                    self.metrics.rollbacks.labels(self.watch.model_name).inc()

    def check_quality(self) -> LoggedPredictions | None:
        """Online accuracy per version and role, comparisons and the label-free estimate.

        Returns the window it judged (the watch reuses it); a log that cannot be read is
        recorded (`/quality`, `opsloop_quality_check_failures_total`), never raised.
        """
        settings = self.settings
        since = None
        if settings.accuracy_window_seconds is not None:
            since = time.time() - settings.accuracy_window_seconds
        try:
            window = read_predictions(self.predlog_url, limit=settings.accuracy_window, since=since)
        except PredictionLogError as exc:
            self.quality_error = str(exc)
            self.metrics.quality_failures.inc()
            return None
        reference = self.reference
        report = assess_quality(
            window,
            estimator=self.estimator,
            estimator_version=reference.model_version if reference is not None else None,
            min_samples=settings.min_samples,
        )
        with self._lock:
            self.quality, self.quality_error = report, None
            self.metrics.record_quality(report)
        return window

    def check(self) -> DriftReport | None:
        """One check: the report, or None when it failed (the failure is recorded, not raised)."""
        started = time.perf_counter()
        with self._lock:
            self.checks += 1
            number = self.checks
        try:
            reference = self._reference()
            window = self._window()
            report = self._detect(reference, window)
        except CheckFailedError as exc:
            self._failed(exc.reason, str(exc), time.perf_counter() - started, exc.window_size)
            return None
        except Exception as exc:  # a bug must not stop the monitor; it shows on /metrics
            logger.exception("drift check failed unexpectedly")
            message = f"unexpected {type(exc).__name__}: {exc}"
            self._failed("internal", message, time.perf_counter() - started, None)
            return None
        seconds = time.perf_counter() - started
        with self._lock:
            self.latest = CheckResult(number, report, window, reference)
            self.last_error = self.last_reason = None
            self.last_check_at = time.time()
            self.metrics.record_success(report, seconds)
        logger.info(
            "drift check %d: %s over %d predictions (fired: %s) in %.2fs",
            number,
            "DRIFT" if report.drift else "no drift",
            report.window_size,
            ", ".join(report.fired) or "none",
            seconds,
        )
        return report

    def _reference(self) -> ReferenceData:
        """The bundle's reference, reloaded when its bundle.json changes (a new export)."""
        try:
            stamp = (self.bundle_path / BUNDLE_JSON).stat().st_mtime_ns
        except OSError:
            stamp = None
        if self.reference is None or stamp != self._reference_stamp:
            try:
                self.reference = load_reference(self.bundle_path)
            except OpsloopError as exc:
                self.reference = None
                raise CheckFailedError("no_reference", str(exc)) from exc
            self._reference_stamp = stamp
            self.estimator = load_bundle_estimator(self.bundle_path)
            accuracy = reference_accuracy(self.bundle_path)
            if accuracy is not None:
                self.metrics.reference_accuracy.set(accuracy)
            logger.info("loaded the reference sample of %s", self.bundle_path)
        return self.reference

    def _window(self) -> Window:
        settings = self.settings
        since = None if settings.window_seconds is None else time.time() - settings.window_seconds
        try:
            return window_from_log(self.predlog_url, last=settings.window, since=since)
        except EmptyWindowError as exc:  # too early for a verdict, not broken
            raise CheckFailedError("window_too_small", str(exc), 0) from exc
        except PredictionLogError as exc:
            raise CheckFailedError("log_unavailable", str(exc)) from exc

    def _detect(self, reference: ReferenceData, window: Window) -> DriftReport:
        settings = self.settings
        if len(window) < settings.min_samples:
            raise CheckFailedError(
                "window_too_small",
                f"the window has {len(window)} predictions, fewer than the minimum "
                f"{settings.min_samples}; waiting for more traffic (or lower "
                f"{ENV_PREFIX}MIN_SAMPLES)",
                len(window),
            )
        try:
            return detect_drift(
                reference,
                window,
                alpha=settings.alpha,
                min_samples=settings.min_samples,
                correction=settings.correction,
            )
        except OpsloopError as exc:
            raise CheckFailedError("bad_window", str(exc), len(window)) from exc

    def _failed(self, reason: str, message: str, seconds: float, window_size: int | None) -> None:
        with self._lock:
            self.last_error, self.last_reason = message, reason
            self.last_check_at = time.time()
            self.metrics.record_failure(reason, seconds, window_size)
        logger.warning("drift check failed (%s): %s", reason, message)

    def health(self) -> dict[str, Any]:
        """The service's own state, for `/drift` and `/health`."""
        with self._lock:
            return {
                "healthy": self.last_reason is None and self.latest is not None,
                "checks": self.checks,
                "last_check_at": self.last_check_at,
                "last_error": self.last_error,
                "last_error_reason": self.last_reason,
                "last_report_check": None if self.latest is None else self.latest.number,
                "interval_seconds": self.settings.interval_seconds,
                "window": self.settings.window,
                "min_samples": self.settings.min_samples,
                "bundle": str(self.bundle_path),
            }

    def html_report(self) -> Path | None:
        """Evidently's HTML report of the latest successful check, rendered once per check."""
        latest = self.latest
        if latest is None:
            return None
        with self._html_lock:
            if self._html is not None and self._html[0] == latest.number:
                return self._html[1]
            if self._report_dir is None:
                self._report_dir = Path(tempfile.mkdtemp(prefix="opsloop-monitor-"))
            path = self._report_dir / "drift-report.html"
            write_html_report(latest.reference, latest.window, path, report=latest.report)
            self._html = (latest.number, path)
            return path


def load_bundle_estimator(bundle_path: Path) -> AccuracyEstimator | None:
    """The bundle's label-free accuracy estimator, or None for a bundle exported without one."""
    path = bundle_path / ESTIMATOR_FILE
    if not path.is_file():
        logger.info("%s has no accuracy estimator: no label-free estimates", bundle_path)
        return None
    try:
        return load_estimator(path)
    except OpsloopError as exc:
        logger.warning("%s", exc)
        return None


def reference_accuracy(bundle_path: Path) -> float | None:
    """The accuracy the bundle's manifest records on its held-out test split."""
    from opsloop.bundle import read_bundle_manifest

    try:
        metrics = read_bundle_manifest(bundle_path).metrics
    except OpsloopError:
        return None
    for key in ("eval/accuracy", "test/acc"):
        if key in metrics:
            return float(metrics[key])
    return None


def make_watch(settings: MonitorSettings) -> RollbackWatch | None:
    """The rollback watch of `watch_model` in the workspace's registry, when one is named."""
    if settings.watch_model is None:
        return None
    from opsloop.config import LoggerConfig
    from opsloop.tracking import resolve_tracking_uri

    workspace = Path(os.environ.get("OPSLOOP_WORKSPACE") or ".")
    rules = WatchRules(
        margin=settings.watch_margin,
        min_labels=settings.watch_min_labels,
        latency_factor=settings.watch_latency_factor,
    )
    uri = resolve_tracking_uri(LoggerConfig(), workspace)
    return RollbackWatch(settings.watch_model, uri, rules)


def resolve_sources(
    bundle: Path | None, predlog_url: str | None, overrides: Sequence[str] = ()
) -> tuple[Path, str]:
    """The reference bundle and prediction log to watch: the arguments, else the defaults.

    The defaults are what `opsloop pipeline` and `opsloop serve` use: the champion's bundle that
    the pipeline materialises in the workspace (`registry.bundle_dir`/`registry.model_name` of the
    config `overrides` compose) and the server's log (`OPSLOOP_PREDLOG_URL`, else the workspace's
    `predictions.db`).
    """
    if bundle is None:
        from opsloop.config import load_config
        from opsloop.predictions import WORKSPACE_ENV
        from opsloop.workspace import Workspace

        cfg = load_config(overrides)
        registry = cfg.registry
        # The same workspace as the log's default and the rollback watch's: OPSLOOP_WORKSPACE,
        # unless a `workspace=` override names another.
        explicit = any(override.startswith("workspace=") for override in overrides)
        root = cfg.workspace if explicit else os.environ.get(WORKSPACE_ENV) or cfg.workspace
        bundle = Workspace(Path(root)).served_bundle(registry.bundle_dir, registry.model_name)
    return bundle, predlog_url or default_log_url()


def check_once(
    bundle: Path,
    predlog_url: str,
    *,
    last: int | None = None,
    since_seconds: float | None = None,
    alpha: float = 0.05,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    html: Path | None = None,
) -> DriftReport:
    """One drift check of the log's last `last` predictions (200 by default) and/or those of the
    last `since_seconds` seconds; with `html`, Evidently's report is written there too."""
    window = window_from_log(
        predlog_url,
        last=DEFAULT_WINDOW if last is None and since_seconds is None else last,
        since=None if since_seconds is None else time.time() - since_seconds,
    )
    reference = load_reference(bundle)
    report = detect_drift(reference, window, alpha=alpha, min_samples=min_samples)
    if html is not None:
        write_html_report(reference, window, html, report=report)
    return report


def quality_once(
    bundle: Path,
    predlog_url: str,
    *,
    last: int = 1000,
    since_seconds: float | None = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> QualityReport:
    """Online accuracy, comparisons and the estimate over the log's last `last` answers."""
    since = None if since_seconds is None else time.time() - since_seconds
    window = read_predictions(predlog_url, limit=last, since=since)
    manifest_version = load_reference(bundle).model_version
    return assess_quality(
        window,
        estimator=load_bundle_estimator(bundle),
        estimator_version=manifest_version,
        min_samples=min_samples,
    )
