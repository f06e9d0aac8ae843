"""The Models page: which version is champion and why.

Every registered version with its aliases, accuracy, gate decision and lineage; the champion
against the challenger metric by metric; and the promotion history, each gate decision (and each
rollback) with its reasons, newest first. Read from MLflow's registry through `opsloop.registry`.
"""

from __future__ import annotations

import streamlit as st

from opsloop.ui.data import (
    LINEAGE_KEYS,
    ModelsView,
    VersionDetail,
    compare_versions,
    read_models,
)
from opsloop.ui.layout import number, percent, reported, short
from opsloop.ui.settings import get_settings


def render() -> None:
    """The page."""
    settings = get_settings()
    st.title("Models")
    view: ModelsView | None = None
    with reported():
        view = read_models(settings.resolved_tracking_uri(), settings.model_name)
    if view is None:
        return
    st.caption(f"Registered model **{view.name}** in the registry at `{view.tracking_uri}`.")
    show_summary(view)
    show_versions(view)
    show_comparison(view)
    show_history(view)


def show_summary(view: ModelsView) -> None:
    champion, challenger, versions = st.columns(3)
    champion.metric("Champion", f"v{view.champion.version}" if view.champion else "none")
    challenger.metric("Challenger", f"v{view.challenger.version}" if view.challenger else "none")
    versions.metric("Versions", len(view.versions))
    if view.champion is None:
        st.info(
            "No champion yet: promote a version with `opsloop promote --version N` (the gate "
            "decides) or run `make run`."
        )


def show_versions(view: ModelsView) -> None:
    st.subheader("Versions")
    st.dataframe(
        [
            {
                "version": f"v{row.version}",
                "aliases": ", ".join(row.aliases) or "-",
                "registered (UTC)": row.created_at,
                "holdout accuracy": percent(row.accuracy),
                "gate": row.decision or "-",
                "gate's reason": row.reason or "-",
                "dataset": short(row.dataset_hash),
                "git commit": short(row.git_commit, 8),
                "MLflow run": short(row.run_id),
            }
            for row in view.versions
        ],
        hide_index=True,
        width="stretch",
    )


def show_comparison(view: ModelsView) -> None:
    st.subheader("Champion and challenger")
    champion, challenger = view.champion, view.challenger
    if champion is not None and challenger is not None and champion.version != challenger.version:
        compare(champion, "champion", challenger, "challenger")
    elif champion is not None and view.previous is not None:
        st.caption(
            f"No challenger waiting: champion v{champion.version} against v"
            f"{view.previous.version}, the champion it replaced."
        )
        compare(view.previous, "previous champion", champion, "champion")
    else:
        only = champion or challenger
        if only is not None:
            show_lineage(only)
        st.info(
            "No separate challenger to compare: register one with `opsloop register --run-id "
            "RUN` (or `opsloop pipeline --no-promote`), then gate it with `opsloop promote`."
        )


def compare(old: VersionDetail, old_role: str, new: VersionDetail, new_role: str) -> None:
    """Metric by metric, then each one's lineage side by side."""
    rows = []
    for name, before, after in compare_versions(old, new):
        difference = None if before is None or after is None else after - before
        rows.append(
            {
                "metric": name,
                f"{old_role} v{old.version}": number(before),
                f"{new_role} v{new.version}": number(after),
                "difference": "-" if difference is None else f"{difference:+.4f}",
            }
        )
    st.dataframe(rows, hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        show_lineage(old)
    with right:
        show_lineage(new)


def show_lineage(detail: VersionDetail) -> None:
    role = ", ".join(detail.aliases) or "version"
    st.markdown(f"**Lineage of v{detail.version}** ({role}), MLflow run `{short(detail.run_id)}`")
    st.dataframe(
        [
            {"tag": key, "value": detail.lineage[key]}
            for key in LINEAGE_KEYS
            if key in detail.lineage
        ],
        hide_index=True,
        width="stretch",
    )


def show_history(view: ModelsView) -> None:
    st.subheader("Promotion history")
    if not view.history:
        st.info("No promotion decided yet: `opsloop promote` gates the challenger.")
        return
    st.dataframe(
        [
            {
                "at (UTC)": event.at.replace("T", " ").split("+")[0],
                "decision": event.verdict,
                "version": f"v{event.version}",
                "champion before": f"v{event.champion_version}" if event.champion_version else "-",
                "its accuracy": percent(event.challenger_accuracy),
                "champion's": percent(event.champion_accuracy),
                "latency ms": number(event.latency_ms, 2),
                "reason": event.reason,
                "holdout": event.holdout,
                "by": event.by,
            }
            for event in view.history
        ],
        hide_index=True,
        width="stretch",
    )
