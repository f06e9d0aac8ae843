"""The Loop page: what the closed loop did, as a timeline.

Every loop run (its trigger and evidence, the production data version it built, the gate's
decision, whether it promoted, why it failed) from the loop database, merged with the registry's
promotions and rollbacks (a rollback is the monitor's watch moving `champion` back), oldest to
newest on one time axis, then the runs in full, newest first.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import streamlit as st

from opsloop.loop.history import RunRecord
from opsloop.ui.data import (
    PromotionEvent,
    TimelineEvent,
    iso,
    loop_timeline,
    read_loop_runs,
    read_models,
)
from opsloop.ui.layout import chart_data, millis, reported, short
from opsloop.ui.settings import UISettings, get_settings

# The timeline's rows, top to bottom, in the order a run goes through them.
LANES = ["trigger", "data", "gate", "promotion", "rollback", "failure"]
COLORS = ["#1f77b4", "#9467bd", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"]


def render() -> None:
    """The page."""
    settings = get_settings()
    st.title("Loop")
    runs: list[RunRecord] | None = None
    with reported():
        runs = read_loop_runs(settings.resolved_loop_db_url())
    if runs is None:
        return
    events = loop_timeline(runs, registry_events(settings))
    st.caption(
        f"{len(runs)} loop runs since {iso(runs[-1].created_at)} UTC; "
        f"{sum(bool(r.promoted) for r in runs)} promoted a new champion."
    )
    show_timeline(events)
    show_runs(runs)


def registry_events(settings: UISettings) -> Sequence[PromotionEvent]:
    """The registry's promotions and rollbacks; none (and a note) when it cannot be read."""
    try:
        return read_models(settings.resolved_tracking_uri(), settings.model_name).history
    except Exception as exc:  # the timeline still shows the loop's own runs
        st.caption(f"Promotions and rollbacks from the registry are left out: {exc}")
        return ()


def show_timeline(events: Sequence[TimelineEvent]) -> None:
    st.subheader("Timeline")
    data = [
        {
            "time": iso(e.at),
            "ms": millis(e.at),
            "kind": e.kind,
            "what": e.title,
            "detail": e.detail[:300],
            "run": e.run_id if e.run_id is not None else "-",
        }
        for e in events
    ]
    chart = (
        alt.Chart(chart_data(data))
        .mark_point(filled=True, size=140)
        .encode(
            x=alt.X(
                "ms:T",
                title="time (UTC)",
                scale=alt.Scale(type="utc"),
                axis=alt.Axis(format="%H:%M:%S", labelOverlap=True),
            ),
            y=alt.Y("kind:N", sort=LANES, title=None),
            color=alt.Color("kind:N", scale=alt.Scale(domain=LANES, range=COLORS), legend=None),
            tooltip=["time:N", "what:N", "detail:N"],
        )
        .properties(height=230)
    )
    st.altair_chart(chart, width="stretch")
    st.dataframe(
        [{k: row[k] for k in ("time", "kind", "what", "detail")} for row in reversed(data)],
        hide_index=True,
        width="stretch",
    )


def show_runs(runs: Sequence[RunRecord]) -> None:
    st.subheader("Runs")
    st.dataframe(
        [
            {
                "run": run.id,
                "created (UTC)": iso(run.created_at),
                "trigger": run.trigger,
                "state": run.state,
                "why": run.reason,
                "data version": f"{run.data_name} {short(run.data_hash)}" if run.data_hash else "-",
                "labels": run.labels if run.labels is not None else "-",
                "MLflow run": short(run.mlflow_run_id),
                "model": f"v{run.model_version}" if run.model_version else "-",
                "champion before": f"v{run.champion_before}" if run.champion_before else "-",
                "promoted": "-" if run.promoted is None else ("yes" if run.promoted else "no"),
                "gate": run.decision or "-",
                "error": run.error or "-",
            }
            for run in runs
        ],
        hide_index=True,
        width="stretch",
    )
