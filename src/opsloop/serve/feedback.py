"""Labels that arrive later: `POST /feedback` validates them and stores them beside the log.

A label names the prediction it belongs to by the request id the server answered with (the
client's own V2 `id`, or the one the server made) and the example's row in that request
(`item`, 0 by default). It is a class index or a class name of the served model. Labels are
appended to the `feedback` table in the prediction log's database, one transaction per call:
posting a label again appends a newer row (the newest wins when read, the older ones remain as
the record of the change), and a label may arrive before its prediction is flushed, or for one
this log never saw — the join happens when the log is read (`opsloop.predictions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from opsloop.errors import ConfigError, OpsloopError, first_line, redact_url
from opsloop.predictions import (
    MAX_REQUEST_ID,
    EngineOptions,
    ensure_schema,
    feedback,
    open_engine,
)
from opsloop.serve.protocol import RequestError

logger = logging.getLogger(__name__)

MAX_LABELS_PER_CALL = 10_000


@dataclass(frozen=True, slots=True)
class Label:
    """One validated label: the example it belongs to and its class index."""

    request_id: str
    item: int
    label: int


def parse_labels(body: Any, class_names: Sequence[str]) -> list[Label]:
    """One label object or a list of them, each checked; a 422 names the first bad one.

    A label is `{"request_id": str, "item": int >= 0 (default 0), "label": index or name}`.
    """
    entries = body if isinstance(body, list) else [body]
    if not entries:
        raise RequestError("send at least one label", status=422, reason="no_labels")
    if len(entries) > MAX_LABELS_PER_CALL:
        raise RequestError(
            f"{len(entries)} labels in one call is over the limit of {MAX_LABELS_PER_CALL}; "
            "split them",
            status=413,
            reason="too_many_labels",
        )
    return [parse_label(entry, index, class_names) for index, entry in enumerate(entries)]


def parse_label(entry: Any, index: int, class_names: Sequence[str]) -> Label:
    """One label entry, or a 422 saying which entry is wrong and how."""
    where = f"label {index}"
    if not isinstance(entry, dict):
        raise RequestError(
            f'{where} must be an object like {{"request_id": "...", "item": 0, "label": 3}}',
            status=422,
            reason="bad_label",
        )
    request_id = entry.get("request_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise RequestError(
            f"{where}: request_id must be the id the prediction was answered with, a string of "
            f"1 to {MAX_REQUEST_ID} characters",
            status=422,
            reason="bad_request_id",
        )
    item = entry.get("item", 0)
    if type(item) is not int or item < 0:
        raise RequestError(
            f"{where}: item {item!r} must be the example's row in its request (0 or more)",
            status=422,
            reason="bad_item",
        )
    return Label(request_id, item, class_index(entry.get("label"), class_names, where))


def class_index(value: Any, class_names: Sequence[str], where: str) -> int:
    """A label given as a class index or a class name, as the index; else a 422 listing both."""
    if type(value) is int and 0 <= value < len(class_names):
        return value
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    raise RequestError(
        f"{where}: {value!r} is not a class of the served model; use an index 0.."
        f"{len(class_names) - 1} or one of the names {', '.join(class_names)}",
        status=422,
        reason="bad_label",
    )


class FeedbackStore:
    """Appends labels to the `feedback` table of the prediction log's database."""

    def __init__(self, url: str, engine_options: EngineOptions | None = None) -> None:
        self.url = url
        self.engine_options = engine_options
        self._engine: Engine | None = None

    def start(self) -> None:
        """Open the database and make sure the table exists (the log's writer does too)."""
        try:
            self._engine = open_engine(self.url, create=True, options=self.engine_options)
            ensure_schema(self._engine)
        except (SQLAlchemyError, OSError, OpsloopError) as exc:
            raise ConfigError(
                f"cannot open the feedback store {redact_url(self.url)}: {first_line(exc)}; "
                "fix OPSLOOP_PREDLOG_URL (labels live beside the prediction log)"
            ) from exc

    def record(self, labels: Sequence[Label]) -> None:
        """Append the labels in one transaction (all or none); a 503 if the database fails."""
        if self._engine is None:
            raise RequestError(
                "labels cannot be stored: the prediction log is off (OPSLOOP_PREDLOG_URL=none)",
                status=503,
                reason="feedback_unavailable",
            )
        now = time.time()
        rows = [
            {"request_id": lab.request_id, "item": lab.item, "label": lab.label, "created_at": now}
            for lab in labels
        ]
        try:
            with self._engine.begin() as connection:
                connection.execute(insert(feedback), rows)
        except SQLAlchemyError as exc:
            logger.warning("storing %d labels failed: %s", len(rows), first_line(exc))
            raise RequestError(
                "the label store is unavailable right now; retry later (nothing was stored)",
                status=503,
                reason="feedback_unavailable",
            ) from exc

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


class NullFeedbackStore(FeedbackStore):
    """The prediction log is off: labels are refused with a 503 that says why."""

    def __init__(self) -> None:
        super().__init__("sqlite://")

    def start(self) -> None:
        pass
