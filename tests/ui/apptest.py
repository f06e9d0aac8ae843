"""Reading what an AppTest run rendered."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def texts(app: AppTest, kind: str) -> list[str]:
    """The text of every element of `kind` (info, warning, error, caption, markdown, ...)."""
    return [str(element.value) for element in getattr(app, kind)]


def everything(app: AppTest) -> str:
    """All text the run rendered, one element a line, for `in` checks."""
    kinds = ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success")
    metrics = [f"{m.label}: {m.value}" for m in app.metric]
    return "\n".join([*(t for kind in kinds for t in texts(app, kind)), *metrics])
