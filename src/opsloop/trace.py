"""Trace one prediction back to where it came from: `opsloop trace REQUEST_ID`.

For every example of the request the prediction log holds (champion, canary or shadow answer):
the model version that answered -> its MLflow run -> the git commit -> the dataset's content hash
-> the config hash, plus the label if one arrived (and how it changed). The log gives the first
link; the registry and the run's lineage tags give the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from opsloop.errors import ModelNotFoundError, OpsloopError
from opsloop.predictions import LabelEvent, read_label_events, read_predictions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lineage:
    """Where a model version came from, as the registry and its training run record it."""

    run_id: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    dataset: str | None = None
    dataset_hash: str | None = None
    config_hash: str | None = None
    note: str | None = None  # why a link is missing


@dataclass(frozen=True)
class TracedAnswer:
    """One logged answer to the request and its chain."""

    item: int
    role: str
    model_name: str
    model_version: str
    predicted: int
    confidence: float
    created_at: float
    label: int | None
    lineage: Lineage


@dataclass(frozen=True)
class Trace:
    request_id: str
    answers: list[TracedAnswer]
    labels: list[LabelEvent] = field(default_factory=list)  # every label event, oldest first


def trace_request(request_id: str, log_url: str, tracking_uri: str) -> Trace:
    """The chain of every logged answer to `request_id`; a ModelNotFoundError if none is logged."""
    logged = read_predictions(log_url, request_id=request_id)
    labels = read_label_events(log_url, request_id)
    if len(logged) == 0:
        hint = " (labels arrived for it, though)" if labels else ""
        raise ModelNotFoundError(
            f"request {request_id!r} is not in the prediction log{hint}; check the id (the "
            "`id` of the V2 response, `request_id` of /predict) and that the log was flushed"
        )
    cache: dict[tuple[str, str], Lineage] = {}
    answers = []
    for row in range(len(logged)):
        key = (logged.model_names[row], logged.model_versions[row])
        if key not in cache:
            cache[key] = version_lineage(*key, tracking_uri)
        truth = int(logged.true_labels[row])
        answers.append(
            TracedAnswer(
                item=int(logged.items[row]),
                role=logged.roles[row],
                model_name=key[0],
                model_version=key[1],
                predicted=int(logged.labels[row]),
                confidence=float(logged.probabilities[row].max()),
                created_at=float(logged.created_at[row]),
                label=None if truth < 0 else truth,
                lineage=cache[key],
            )
        )
    return Trace(request_id, answers, labels)


def version_lineage(model_name: str, version: str, tracking_uri: str) -> Lineage:
    """The registry version's run and its lineage tags; a note instead when a link is missing."""
    from opsloop.registry import get_version
    from opsloop.tracking import run_lineage

    try:
        info = get_version(f"{model_name}/{version}", tracking_uri)
    except OpsloopError as exc:
        return Lineage(note=f"not in the registry ({exc})")
    if info.run_id is None:
        return Lineage(note="the registry version has no source run")
    try:
        tags = run_lineage(info.run_id, tracking_uri)
    except OpsloopError as exc:
        return Lineage(run_id=info.run_id, note=str(exc))
    return Lineage(
        run_id=info.run_id,
        git_commit=tags.get("git_commit"),
        git_dirty=None if "git_dirty" not in tags else tags["git_dirty"] == "true",
        dataset=tags.get("dataset_name"),
        dataset_hash=tags.get("dataset_hash"),
        config_hash=tags.get("config_hash"),
    )
