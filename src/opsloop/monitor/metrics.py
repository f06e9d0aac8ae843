"""The monitoring service's Prometheus metrics: the drift verdict, per detector, and its own health.

Gauges start at NaN ("no verdict yet") rather than 0, so an alert on `opsloop_drift_detected == 1`
cannot be confused by a monitor that has not checked anything. Each service owns a private
registry, so several monitors (or tests) in one process never share samples.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from opsloop.monitor.quality import QualityReport
from opsloop.monitor.report import DETECTORS, DriftReport

# Why a check failed, as the `reason` label of the failure metrics.
REASONS = ("no_reference", "log_unavailable", "window_too_small", "bad_window", "internal")
OUTCOMES = ("ok", "failed")
NAN = float("nan")

PREFIX = "opsloop_drift_"
# name (after PREFIX) -> help, for the unlabelled gauges.
GAUGES = {
    "detected": "1 when the last successful check found drift, 0 when not; NaN before any",
    "score": "Largest share of drifted features of any detector (0..1), last successful check",
    "p_value": "Smallest multiple-testing corrected p-value, last successful check",
    "window_size": "Predictions in the window of the last check (also when too small to check)",
    "min_samples": "The smallest window that is checked at all",
    "mixed_versions": "1 when the last checked window mixed model versions",
    "last_check_timestamp_seconds": "Unix time of the last check, successful or not",
    "last_success_timestamp_seconds": "Unix time of the last successful check (0 before any)",
    "check_duration_seconds": "Seconds the last check took (reading the log and testing)",
    "monitor_healthy": "1 when the last check succeeded, 0 when it failed (see ..._last_error)",
}
# name (after PREFIX) -> help, for the gauges labelled by detector.
DETECTOR_GAUGES = {
    "detector_detected": "1 when the detector fired in the last successful check",
    "detector_score": "Share of the detector's features that drifted (0..1)",
    "detector_p_value": "The detector's smallest corrected p-value",
}


# name -> help, for the gauges labelled by model version and role (online quality).
QUALITY_GAUGES = {
    "opsloop_online_accuracy": "Accuracy of the labelled predictions in the window",
    "opsloop_online_accuracy_lower": "Lower end of its 95% Wilson interval",
    "opsloop_online_accuracy_upper": "Upper end of its 95% Wilson interval",
    "opsloop_labelled_predictions": "Predictions in the window a label has arrived for",
    "opsloop_window_predictions": "Predictions in the quality window",
    "opsloop_label_coverage": "Share of the window's predictions that have a label (0..1)",
    "opsloop_label_delay_seconds": "Median seconds from an answer to its label",
    "opsloop_latency_p95_ms": "95th percentile of the logged answer latency, milliseconds",
}
# name -> help, for the gauges of a challenger against the champion.
COMPARISON_GAUGES = {
    "opsloop_challenger_accuracy_difference": "Challenger minus champion accuracy, same period",
    "opsloop_challenger_accuracy_difference_lower": "Lower end of its 95% Newcombe interval",
    "opsloop_challenger_accuracy_difference_upper": "Upper end of its 95% Newcombe interval",
    "opsloop_challenger_p_value": "Two-sided p-value of the two-proportion test",
}
COMPARISON_LABELS = ["champion_version", "challenger_version", "role"]


class MonitorMetrics:
    """The service's metrics, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.gauges = {
            name: Gauge(PREFIX + name, text, registry=self.registry)
            for name, text in GAUGES.items()
        }
        self.detector_gauges = {
            name: Gauge(PREFIX + name, text, ["detector"], registry=self.registry)
            for name, text in DETECTOR_GAUGES.items()
        }
        self.last_error = Gauge(
            "opsloop_drift_last_error",
            "1 for the reason the last check failed, 0 for the others",
            ["reason"],
            registry=self.registry,
        )
        self.checks = Counter(
            "opsloop_drift_checks", "Drift checks by outcome", ["outcome"], registry=self.registry
        )
        self.failures = Counter(
            "opsloop_drift_check_failures",
            "Failed drift checks by reason",
            ["reason"],
            registry=self.registry,
        )
        self.quality = {
            name: Gauge(name, text, ["model_version", "role"], registry=self.registry)
            for name, text in QUALITY_GAUGES.items()
        }
        self.comparison = {
            name: Gauge(name, text, COMPARISON_LABELS, registry=self.registry)
            for name, text in COMPARISON_GAUGES.items()
        }
        self.estimated_accuracy = Gauge(
            "opsloop_estimated_accuracy",
            "Label-free ESTIMATE of the accuracy of the window's champion answers",
            ["model_version", "method"],
            registry=self.registry,
        )
        self.reference_accuracy = Gauge(
            "opsloop_reference_accuracy",
            "The reference bundle's accuracy on its held-out test split (what alerts compare to)",
            registry=self.registry,
        )
        self.quality_failures = Counter(
            "opsloop_quality_check_failures",
            "Quality checks that could not read the log",
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "opsloop_rollbacks",
            "Champions moved back by the watch after a promotion",
            ["model"],
            registry=self.registry,
        )
        self._set_initial_values()

    def _set_initial_values(self) -> None:
        for name in ("detected", "score", "p_value", "window_size"):
            self.set(name, NAN)  # no verdict before the first check
        for gauge in self.detector_gauges.values():
            for detector in DETECTORS:
                gauge.labels(detector).set(NAN)
        for reason in REASONS:
            self.last_error.labels(reason).set(0)
            self.failures.labels(reason)
        for outcome in OUTCOMES:
            self.checks.labels(outcome)
        self.set("monitor_healthy", 0)
        self.set("last_success_timestamp_seconds", 0)

    def set(self, name: str, value: float) -> None:
        """Set one unlabelled gauge by its name after `opsloop_drift_`."""
        self.gauges[name].set(value)

    def record_success(self, report: DriftReport, seconds: float) -> None:
        self.set("detected", int(report.drift))
        self.set("score", report.score)
        self.set("p_value", report.p_value)
        for detector in report.detectors:
            values = {"detected": int(detector.drift), "score": detector.score}
            values["p_value"] = detector.p_value
            for suffix, value in values.items():
                self.detector_gauges[f"detector_{suffix}"].labels(detector.name).set(value)
        self.set("window_size", report.window_size)
        self.set("mixed_versions", int(report.mixed_versions))
        self.checks.labels("ok").inc()
        self.set("monitor_healthy", 1)
        for reason in REASONS:
            self.last_error.labels(reason).set(0)
        now = time.time()
        self.set("last_check_timestamp_seconds", now)
        self.set("last_success_timestamp_seconds", now)
        self.set("check_duration_seconds", seconds)

    def record_failure(self, reason: str, seconds: float, window_size: int | None) -> None:
        if window_size is not None:
            self.set("window_size", window_size)
        self.checks.labels("failed").inc()
        self.failures.labels(reason).inc()
        self.set("monitor_healthy", 0)
        for known in REASONS:
            self.last_error.labels(known).set(int(known == reason))
        self.set("last_check_timestamp_seconds", time.time())
        self.set("check_duration_seconds", seconds)

    def record_quality(self, report: QualityReport) -> None:
        """Publish online accuracy, coverage, delay and latency per version and role, the
        challengers' comparisons and the estimates; series of versions gone are dropped."""
        for gauge in (*self.quality.values(), *self.comparison.values()):
            gauge.clear()
        self.estimated_accuracy.clear()
        for quality in report.versions:
            labels = (quality.model_version, quality.role)
            values = {
                "opsloop_labelled_predictions": quality.labelled,
                "opsloop_window_predictions": quality.predictions,
                "opsloop_label_coverage": quality.label_coverage,
                "opsloop_latency_p95_ms": quality.latency_ms_p95,
            }
            if quality.accuracy is not None:
                values["opsloop_online_accuracy"] = quality.accuracy.value
                values["opsloop_online_accuracy_lower"] = quality.accuracy.lower
                values["opsloop_online_accuracy_upper"] = quality.accuracy.upper
            if quality.label_delay_seconds is not None:
                values["opsloop_label_delay_seconds"] = quality.label_delay_seconds
            for name, value in values.items():
                self.quality[name].labels(*labels).set(value)
        for comparison in report.comparisons:
            pair = (
                comparison.champion_version,
                comparison.challenger_version,
                comparison.challenger_role,
            )
            for name, value in (
                ("opsloop_challenger_accuracy_difference", comparison.difference),
                ("opsloop_challenger_accuracy_difference_lower", comparison.lower),
                ("opsloop_challenger_accuracy_difference_upper", comparison.upper),
                ("opsloop_challenger_p_value", comparison.p_value),
            ):
                self.comparison[name].labels(*pair).set(value)
        for estimate in report.estimates:
            self.estimated_accuracy.labels(estimate.model_version, estimate.method).set(
                estimate.value
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)
