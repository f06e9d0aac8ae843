"""The Monitoring page: is the model still right, and is the world it sees still the same?

From the prediction log (the last `OPSLOOP_UI_WINDOW` answers): online accuracy per model version
and role where labels arrived and the label-free estimate where they did not, both over time;
drift over time, each detector's corrected p-value on consecutive windows of champion answers
judged against the bundle's reference as `opsloop monitor` judges them; and the recent answers,
least confident first. The monitoring service's own latest verdict is shown when it runs.
"""

from __future__ import annotations

import altair as alt
import streamlit as st

from opsloop.monitor.quality import QualityReport
from opsloop.predictions import LoggedPredictions
from opsloop.ui.client import read_monitor_status
from opsloop.ui.data import (
    VersionBundles,
    accuracy_over_time,
    assess_log,
    drift_over_time,
    iso,
    least_confident,
    read_log,
)
from opsloop.ui.layout import chart_data, millis, percent, reported
from opsloop.ui.settings import UISettings, get_settings
from opsloop.workspace import Workspace

GALLERY = 12  # answers shown, least confident first
GALLERY_COLUMNS = 6
ACCURACY_CHUNK = 50  # labelled answers per accuracy point
UTC_SCALE = alt.Scale(type="utc")
TIME_AXIS = alt.Axis(format="%H:%M:%S", labelOverlap=True)


def render() -> None:
    """The page."""
    settings = get_settings()
    st.title("Monitoring")
    show_monitor_status(settings)
    logged: LoggedPredictions | None = None
    with reported():
        logged = read_log(settings.resolved_predlog_url(), settings.window)
    if logged is None:
        return
    versions = sorted(set(logged.model_versions), key=lambda v: (len(v), v))
    st.caption(
        f"The last {len(logged)} answers in the prediction log ({iso(logged.created_at[0])} to "
        f"{iso(logged.created_at[-1])} UTC), {int(logged.labelled.sum())} with a true label; "
        f"model versions {', '.join('v' + v for v in versions)}."
    )
    bundles = version_bundles(settings)
    with reported():
        show_quality(logged, bundles)
    with reported():
        show_drift(logged, bundles, settings)
    with reported():
        show_gallery(logged, settings)


def show_monitor_status(settings: UISettings) -> None:
    """One line on the monitoring service, which is optional: a caption, never an error."""
    if not settings.monitor_enabled:
        return
    try:
        timeout = min(3.0, settings.timeout_seconds)
        status = read_monitor_status(settings.monitor_url, timeout=timeout)
    except Exception as exc:  # any failure: the page computes everything from the log anyway
        st.caption(f"Monitoring service: {exc}")
        return
    if status.error is not None:
        st.caption(f"Monitoring service at {status.url}: no verdict yet ({status.error}).")
        return
    verdict = "DRIFT in " + ", ".join(status.fired) if status.drift else "no drift"
    st.caption(
        f"Monitoring service at {status.url}: {verdict} on its last {status.window_size} "
        f"answers, checked {status.checked_at}."
    )


def show_quality(logged: LoggedPredictions, bundles: VersionBundles) -> None:
    st.subheader("Accuracy")
    report = assess_log(logged, bundles)
    st.dataframe(quality_rows(report), hide_index=True, width="stretch")
    points = accuracy_over_time(logged, chunk=ACCURACY_CHUNK, bundles=bundles)
    if not points:
        st.info(
            "No accuracy over time yet: post true labels (the Predict page's Send label, or "
            "`POST /feedback`) for online accuracy."
        )
        return
    data = [
        {"time": millis(p.at), "accuracy": p.accuracy, "series": p.series, "answers": p.count}
        for p in points
    ]
    chart = (
        alt.Chart(chart_data(data))
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title="time (UTC)", scale=UTC_SCALE, axis=TIME_AXIS),
            y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy"),
            color=alt.Color("series:N", title="version"),
            tooltip=["series:N", "time:T", alt.Tooltip("accuracy:Q", format=".1%"), "answers:Q"],
        )
        .properties(height=260)
    )
    st.altair_chart(chart, width="stretch")
    st.caption(
        f"Online: each point is {ACCURACY_CHUNK} labelled champion answers. Estimated: the "
        "bundle's label-free estimator on as many answers, no labels needed."
    )


def quality_rows(report: QualityReport) -> list[dict[str, str | int]]:
    estimates = {e.model_version: e.value for e in report.estimates}
    rows: list[dict[str, str | int]] = []
    for q in report.versions:
        accuracy = q.accuracy
        measured = (
            "no labels yet"
            if accuracy is None
            else f"{accuracy.value:.1%} (95% {accuracy.lower:.1%}..{accuracy.upper:.1%})"
        )
        rows.append(
            {
                "version": f"v{q.model_version}",
                "role": q.role,
                "answers": q.predictions,
                "labelled": q.labelled,
                "online accuracy": measured,
                "estimated": percent(estimates.get(q.model_version))
                if q.role == "champion"
                else "-",
                "label coverage": percent(q.label_coverage),
                "p95 latency ms": f"{q.latency_ms_p95:.2f}",
            }
        )
    return rows


def show_drift(logged: LoggedPredictions, bundles: VersionBundles, settings: UISettings) -> None:
    st.subheader("Drift over time")
    points = drift_over_time(logged, bundles, window=settings.drift_window, alpha=settings.alpha)
    if not points:
        st.info(
            f"No drift check yet: each needs at least 30 champion answers of one version (a "
            f"window holds {settings.drift_window}) and that version's bundle, found at "
            f"{settings.resolved_bundle_path()} or in the registry. Send more traffic (e.g. "
            "`opsloop simulate`), or run `make run` for a bundle."
        )
        return
    floor = 1e-12  # a p-value of 0 has no place on a log scale
    data = [
        {
            "time": millis(p.at),
            "detector": p.detector,
            "p-value": max(p.p_value, floor),
            "drift": "drift" if p.drift else "ok",
            "window": p.window_size,
            "version": f"v{p.model_version}",
        }
        for p in points
    ]
    lines = (
        alt.Chart(chart_data(data))
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title="window end (UTC)", scale=UTC_SCALE, axis=TIME_AXIS),
            y=alt.Y("p-value:Q", scale=alt.Scale(type="log"), title="corrected p-value"),
            color=alt.Color("detector:N"),
            detail=alt.Detail("version:N"),  # one line per version: a swap starts anew
            shape=alt.Shape("drift:N", title="verdict"),
            tooltip=["detector:N", "time:T", "p-value:Q", "drift:N", "window:Q", "version:N"],
        )
    )
    rule = (
        alt.Chart(chart_data([{"alpha": settings.alpha}]))
        .mark_rule(strokeDash=[4, 4], color="red")
        .encode(y="alpha:Q")
    )
    st.altair_chart((lines + rule).properties(height=280), width="stretch")
    last = max(p.at for p in points)
    fired = sorted({p.detector for p in points if p.at == last and p.drift})
    verdict = f"DRIFT ({', '.join(fired)})" if fired else "no drift"
    st.caption(
        f"Windows of {settings.drift_window} champion answers against the bundle's reference "
        f"sample; below the dashed line (alpha {settings.alpha:g}, Holm-corrected) a detector "
        f"fires. Latest window: {verdict}."
    )


def show_gallery(logged: LoggedPredictions, settings: UISettings) -> None:
    st.subheader("Recent predictions, least confident first")
    reference_pixel_max = pixel_scale(settings)
    answers = least_confident(logged, GALLERY, reference_pixel_max)
    columns = st.columns(GALLERY_COLUMNS)
    for index, answer in enumerate(answers):
        truth = "" if answer.true_label is None else f", true {answer.true_label}"
        mark = " ✗" if answer.wrong else ""
        with columns[index % GALLERY_COLUMNS]:
            st.image(
                answer.image,
                caption=f"{answer.label} at {percent(answer.confidence)}{truth}{mark} "
                f"(v{answer.model_version} {answer.role})",
                width=96,
            )


def version_bundles(settings: UISettings) -> VersionBundles:
    """Each version's bundle: the workspace's served one, the registry's cache, the registry.

    Built per render, not kept: a promotion replaces the served bundle under the same path.
    """
    return VersionBundles(
        settings.resolved_bundle_path(),
        settings.model_name,
        settings.resolved_tracking_uri(),
        Workspace(settings.workspace).bundle_cache,
    )


def pixel_scale(settings: UISettings) -> float:
    """The model's pixel scale from the bundle (logged inputs are on it), 16 for digits."""
    from opsloop.bundle import read_bundle_manifest
    from opsloop.errors import OpsloopError

    try:
        return float(read_bundle_manifest(settings.resolved_bundle_path()).preprocessing.pixel_max)
    except OpsloopError:
        return 16.0
