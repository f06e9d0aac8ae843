"""Page pieces every page shares: how a problem is shown, and small formatting helpers.

A page wraps each section that reads something in `with reported():`. A store that is not there
yet (`NoDataError`) becomes a blue note saying what to run, a server that does not answer a
yellow one-line warning, any other opsloop error a red line; an unexpected exception is one red
line too, with its traceback in the app's log rather than on the page. The section stops there
and the rest of the page still renders.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import altair as alt
import streamlit as st

from opsloop.errors import OpsloopError, first_line
from opsloop.ui.client import ServerUnavailableError
from opsloop.ui.data import NoDataError

logger = logging.getLogger(__name__)


def show_problem(exc: BaseException) -> None:
    """One line on the page for `exc`, styled by what the user can do about it."""
    message = sentence(str(exc))
    if isinstance(exc, NoDataError):
        st.info(message, icon=":material/info:")
    elif isinstance(exc, ServerUnavailableError):
        st.warning(message, icon=":material/cloud_off:")
    elif isinstance(exc, OpsloopError):
        st.error(message, icon=":material/error:")
    else:
        logger.exception("unexpected failure while rendering a page")
        st.error(
            f"unexpected {type(exc).__name__}: {first_line(exc)} (the app's log has the details)",
            icon=":material/bug_report:",
        )


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Run a section; show what went wrong instead of a traceback. Streamlit's own control flow
    (`st.stop`, `st.rerun`) derives from BaseException and passes through untouched."""
    try:
        yield
    except Exception as exc:
        show_problem(exc)


def sentence(message: str) -> str:
    """An error's one line (lower case for the CLI's `error: ...`) as a sentence on a page."""
    return message[:1].upper() + message[1:]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def short(text: str | None, length: int = 12) -> str:
    """A hash or an id cut to `length` characters, "-" when absent."""
    return "-" if not text else text[:length]


def millis(timestamp: float) -> float:
    """Unix seconds as the epoch milliseconds Vega-Lite reads a temporal field as (UTC)."""
    return timestamp * 1000.0


def chart_data(rows: list[dict[str, Any]]) -> alt.Data:
    """Rows as an Altair chart's inline data (no pandas frame needed)."""
    return alt.Data(values=rows)  # type: ignore[no-untyped-call]  # altair's own annotation gap
