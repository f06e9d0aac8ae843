"""Replayable scenarios: `opsloop simulate --scenario rotation` drives a running stack.

A scenario sends clean traffic, then traffic under a shift that hurts the model badly, at a steady
rate, and plays the labelling system: for a share of the answers it posts the true label to
`/feedback` after a delay. Every answer is recorded (when, which phase, which model version
answered, whether it was right) so the story can be told afterwards: when accuracy fell, when the
loop promoted a retrained model, when accuracy came back. The images come from the dataset's test
split; a part of it is never sent (`holdout`), so a model can be judged on shifted images neither
training nor production traffic ever showed it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from opsloop.corruption import get_corruption
from opsloop.errors import ConfigError
from opsloop.monitor.simulate import check_target, infer_body, wait_until_ready

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """Clean traffic, then a shift; a share of the answers labelled after a delay."""

    name: str
    description: str
    corruption: str
    severity: int
    clean_seconds: float = 60.0
    shift_seconds: float = 300.0
    rate: float = 10.0  # requests per second (one image each)
    label_fraction: float = 0.5
    label_delay_seconds: float = 5.0
    holdout_fraction: float = 0.25  # of the image pool, never sent

    def scaled(self, factor: float) -> Scenario:
        """The same story, its phases `factor` times as long (shortened for tests)."""
        from dataclasses import replace

        return replace(
            self,
            clean_seconds=self.clean_seconds * factor,
            shift_seconds=self.shift_seconds * factor,
        )


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "rotation",
            "digits rotated by 30 degrees (either way): the champion falls to ~50%",
            "rotation",
            2,
        ),
        Scenario(
            "blur",
            "digits blurred (sigma 0.8 px): the champion falls to ~55%",
            "gaussian_blur",
            2,
        ),
        Scenario(
            "contrast",
            "faded digits (40% contrast): the champion falls to ~10%",
            "contrast",
            2,
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ConfigError(
            f"unknown scenario {name!r}; use one of: {', '.join(SCENARIOS)}"
        ) from None


@dataclass
class Answer:
    """One answered (or failed) request."""

    at: float  # seconds since the scenario started
    phase: str  # clean or shifted
    request_id: str
    status: int
    model_version: str | None
    predicted: int | None
    correct: bool | None = None
    labelled: bool = False


@dataclass
class Timeline:
    """Everything a scenario run sent and got back."""

    scenario: Scenario
    started: float  # Unix time
    shift_at: float  # seconds since start
    answers: list[Answer] = field(default_factory=list)
    labels_posted: int = 0
    label_failures: int = 0

    @property
    def failed(self) -> int:
        return sum(answer.status != 200 for answer in self.answers)

    def accuracy(self, start: float, end: float) -> float | None:
        """The share of right answers among those answered in [start, end) seconds."""
        window = [a.correct for a in self.answers if start <= a.at < end and a.correct is not None]
        return float(np.mean(window)) if window else None


def split_pool(
    images: npt.NDArray[Any], labels: npt.NDArray[Any], holdout_fraction: float, seed: int
) -> tuple[tuple[npt.NDArray[Any], npt.NDArray[Any]], tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
    """(sent, held out): a seeded split of the test pool; the held-out part is never sent."""
    order = np.random.default_rng(seed).permutation(len(labels))
    held = round(len(order) * holdout_fraction)
    keep, hold = order[held:], order[:held]
    return (images[keep], labels[keep]), (images[hold], labels[hold])


class LabelPoster:
    """Posts labels to `/feedback` when they are due, from a thread of its own."""

    def __init__(self, client: httpx.Client, base: str, timeline: Timeline) -> None:
        self.client = client
        self.base = base
        self.timeline = timeline
        self.queue: list[tuple[float, str, int]] = []
        self.lock = threading.Condition()
        self.done = False
        self.thread = threading.Thread(target=self._run, name="labels", daemon=True)
        self.thread.start()

    def later(self, due: float, request_id: str, label: int) -> None:
        with self.lock:
            heapq.heappush(self.queue, (due, request_id, label))
            self.lock.notify()

    def close(self) -> None:
        """Post everything still queued (not waiting for its delay), then stop."""
        with self.lock:
            self.done = True
            self.lock.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.done:
                    self.lock.wait()
                if not self.queue:
                    return
                due, request_id, label = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0 and not self.done:
                    self.lock.wait(wait)
                    continue
                heapq.heappop(self.queue)
            self._post(request_id, label)

    def _post(self, request_id: str, label: int) -> None:
        try:
            response = self.client.post(
                f"{self.base}/feedback", json={"request_id": request_id, "label": label}
            )
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            self.timeline.labels_posted += 1
        else:
            self.timeline.label_failures += 1


def run_scenario(
    scenario: Scenario,
    url: str,
    images: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    *,
    model_name: str,
    input_name: str,
    pixel_max: float,
    seed: int = 0,
    on_answer: Callable[[Answer], None] | None = None,
) -> Timeline:
    """Play `scenario` against the server at `url` with the (sent part of the) image pool."""
    base = check_target(url)
    rng = np.random.default_rng(seed)
    corruption = get_corruption(scenario.corruption)
    timeline = Timeline(scenario, time.time(), scenario.clean_seconds)
    total = scenario.clean_seconds + scenario.shift_seconds
    path = f"{base}/v2/models/{model_name}/infer"
    with httpx.Client(timeout=30.0) as client:
        wait_until_ready(client, base, model_name)
        poster = LabelPoster(client, base, timeline)
        start = time.monotonic()
        index = 0
        try:
            while (elapsed := time.monotonic() - start) < total:
                due = start + index / scenario.rate
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                phase = "clean" if elapsed < scenario.clean_seconds else "shifted"
                pick = int(rng.integers(len(labels)))
                image = images[pick : pick + 1]
                if phase == "shifted":
                    image = corruption(image, scenario.severity, pixel_max=pixel_max, rng=rng)
                answer = _ask(client, path, image, f"{scenario.name}-{index}", input_name)
                answer.at, answer.phase = time.monotonic() - start, phase
                truth = int(labels[pick])
                if answer.predicted is not None:
                    answer.correct = answer.predicted == truth
                if answer.status == 200 and rng.random() < scenario.label_fraction:
                    due = time.monotonic() + scenario.label_delay_seconds
                    poster.later(due, answer.request_id, truth)
                    answer.labelled = True
                timeline.answers.append(answer)
                if on_answer is not None:
                    on_answer(answer)
                index += 1
        finally:
            poster.close()
    logger.info(
        "scenario %s: %d requests, %d failed, %d labels posted",
        scenario.name,
        len(timeline.answers),
        timeline.failed,
        timeline.labels_posted,
    )
    return timeline


def _ask(
    client: httpx.Client, path: str, image: npt.NDArray[Any], request_id: str, input_name: str
) -> Answer:
    try:
        response = client.post(
            path,
            content=infer_body(image, request_id, input_name),
            headers={"content-type": "application/json"},
        )
    except httpx.HTTPError as exc:
        logger.warning("request %s failed: %s", request_id, exc)
        return Answer(0.0, "", request_id, 0, None, None)
    if response.status_code != 200:
        return Answer(0.0, "", request_id, response.status_code, None, None)
    body = response.json()
    predicted = next(o["data"][0] for o in body["outputs"] if o["name"] == "label")
    return Answer(0.0, "", request_id, 200, body["model_version"], int(predicted))
