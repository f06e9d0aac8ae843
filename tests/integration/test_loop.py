"""The closed loop end to end, with real processes: a shift hurts the champion, the loop sees it,
builds a data version from the labelled production traffic, retrains, gates, promotes, and the
server swaps — with no failed request; and a challenger that is not better changes nothing.

The workspace is a DVC project with a local remote, so the new data version is versioned and
pushed for real. The scenario is `rotation`, shortened.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.bundle import PROBABILITIES, onnx_session, run_onnx
from opsloop.config import LoggerConfig
from opsloop.corruption import get_corruption
from opsloop.data import load_split, read_manifest
from opsloop.loop.history import RUNNING, History
from opsloop.loop.retrain import retrain
from opsloop.loop.settings import load_loop_settings
from opsloop.monitor.scenario import Timeline, get_scenario, run_scenario, split_pool
from opsloop.registry import cached_bundle, get_version
from opsloop.tracking import resolve_tracking_uri, run_lineage
from tests.integration.processes import OPSLOOP, free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.integration]
MODEL = "digits-cnn"


@dataclass
class Stack:
    workspace: Path
    processed: Path
    remote: Path
    uri: str
    env: dict[str, str]


def dvc(workspace: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=workspace, check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A DVC workspace with a champion (v1) trained by `opsloop pipeline`."""
    workspace = tmp_path_factory.mktemp("loop")
    processed, remote = workspace / "data" / "processed", workspace.parent / "dvc-remote"
    dvc(workspace, "init", "--no-scm", "--quiet")
    dvc(workspace, "remote", "add", "--default", "local", str(remote))
    env = {
        "OPSLOOP_WORKSPACE": str(workspace),
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{workspace / 'predictions.db'}",
        "DVC_NO_ANALYTICS": "1",
    }
    overrides = [
        f"workspace={workspace}",
        f"data.processed_dir={processed}",
        "trainer.max_epochs=15",
    ]
    subprocess.run(
        [*OPSLOOP, "pipeline", *overrides],
        cwd=workspace,
        env={**__import__("os").environ, **env},
        check=True,
        capture_output=True,
    )
    uri = resolve_tracking_uri(LoggerConfig(), workspace)
    return Stack(workspace, processed, remote, uri, env)


def loop_env(stack: Stack, port: int, **extra: str) -> dict[str, str]:
    return stack.env | {
        "OPSLOOP_LOOP_PORT": str(port),
        "OPSLOOP_LOOP_WORKSPACE": str(stack.workspace),
        "OPSLOOP_LOOP_INTERVAL_SECONDS": "2",
        "OPSLOOP_LOOP_MAX_RUNS_PER_DAY": "1",
        # Enough shifted examples to learn from and to judge on: the estimate fires within
        # seconds of the shift, long before that many labels are in.
        "OPSLOOP_LOOP_MIN_NEW_LABELS": "150",
        "OPSLOOP_LOOP_MIN_ACCURACY_LABELS": "30",
        "OPSLOOP_LOOP_OVERRIDES": (
            f"data.processed_dir={stack.processed} data.min_labels=30 trainer.max_epochs=15"
        ),
        **extra,
    }


def accuracy(
    stack: Stack, version: str, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64]
) -> float:
    bundle = cached_bundle(
        get_version(f"{MODEL}/{version}", stack.uri), stack.uri, stack.workspace / "cache"
    )
    probabilities = run_onnx(onnx_session(bundle.model_path), images.astype(np.float32))[
        PROBABILITIES
    ]
    return float((probabilities.argmax(axis=1) == labels).mean())


@pytest.fixture(scope="module")
def played(stack: Stack) -> Iterator[Timeline]:
    """`opsloop serve` and `opsloop loop serve` through a shortened rotation scenario."""
    serve_port, loop_port = free_port(), free_port()
    serve_env = stack.env | {"OPSLOOP_PORT": str(serve_port), "OPSLOOP_RELOAD_POLL_SECONDS": "1"}
    test = load_split(stack.processed / "digits", "test")
    scenario = get_scenario("rotation").scaled(0.25)  # 15 s clean, 75 s shifted
    (images, labels), _ = split_pool(test.images, test.labels, scenario.holdout_fraction, seed=0)
    with (
        running([*OPSLOOP, "serve"], stack.workspace / "serve.log", serve_env) as server,
        running(
            [*OPSLOOP, "loop", "serve"], stack.workspace / "loop.log", loop_env(stack, loop_port)
        ) as loop,
    ):
        server.wait_for_http(f"http://127.0.0.1:{serve_port}/v2/health/ready")
        loop.wait_for_http(f"http://127.0.0.1:{loop_port}/health")
        timeline = run_scenario(
            scenario,
            f"http://127.0.0.1:{serve_port}",
            images,
            labels,
            model_name=MODEL,
            input_name="pixels",
            pixel_max=16.0,
        )
        wait_for_runs_to_finish(stack)
        yield timeline


def wait_for_runs_to_finish(stack: Stack, timeout: float = 180.0) -> None:
    """A run the loop started late in the scenario finishes before anything is asserted."""
    history = History(f"sqlite:///{stack.workspace / 'loop.db'}")
    deadline = time.monotonic() + timeout
    try:
        while history.in_state(RUNNING):
            assert time.monotonic() < deadline, f"a loop run still running after {timeout:g} s"
            time.sleep(1.0)
    finally:
        history.dispose()


def test_a_shift_is_detected_retrained_on_production_labels_and_promoted(
    stack: Stack, played: Timeline
) -> None:
    history = History(f"sqlite:///{stack.workspace / 'loop.db'}")
    # The runs the loop started on its own (the other test asks for one by hand, in any order).
    runs = [r for r in history.recent() if r.started_at is not None and r.trigger != "manual"]
    history.dispose()
    assert played.failed == 0
    [run] = runs  # at most one run a day here
    assert run.trigger in ("accuracy", "estimate", "drift"), run.reason
    assert run.state == "succeeded", run.error or run.decision
    assert run.promoted
    assert run.started_at is not None
    assert run.started_at > played.started + played.shift_at - 1  # detected after the shift
    # The data version: base + labelled production examples, written and versioned with DVC.
    data = stack.processed / "digits-production"
    manifest = read_manifest(data)
    assert manifest.content_hash == run.data_hash
    assert (run.labels or 0) >= 30
    assert "labelled predictions" in manifest.source
    assert (stack.processed / "digits-production.dvc").is_file()
    assert any(path.is_file() for path in stack.remote.rglob("*"))  # pushed
    # The challenger was trained on it, passed the gate and is the champion now.
    champion = get_version(f"{MODEL}@champion", stack.uri)
    assert champion.version == run.model_version == "2"
    lineage = run_lineage(champion.run_id or "", stack.uri)
    assert (lineage["dataset_name"], lineage["dataset_hash"]) == (data.name, run.data_hash)
    assert lineage["loop_run"] == str(run.id)
    # The server swapped to it under traffic.
    versions = [answer.model_version for answer in played.answers]
    assert versions[0] == "1"
    assert "2" in versions
    # Better on shifted images that neither the traffic nor training ever showed.
    test = load_split(stack.processed / "digits", "test")
    scenario = played.scenario
    _, (held, truth) = split_pool(test.images, test.labels, scenario.holdout_fraction, seed=0)
    rotated = get_corruption(scenario.corruption)(held, scenario.severity, pixel_max=16.0, rng=1)
    assert accuracy(stack, "2", rotated, truth) > accuracy(stack, "1", rotated, truth)


def data_version(stack: Stack) -> tuple[str, str] | None:
    """The production data's content hash and its DVC file, or None where there is none."""
    data = stack.processed / "digits-production"
    if not data.exists():
        return None
    return read_manifest(data).content_hash, data.with_suffix(".dvc").read_text()


def test_a_challenger_that_is_not_better_changes_nothing(stack: Stack, played: Timeline) -> None:
    """Asking for an improvement nobody can make: refused; champion and data as they were."""
    before = data_version(stack)  # the other test's run may or may not have made one yet
    champion = get_version(f"{MODEL}@champion", stack.uri).version
    settings = load_loop_settings(
        workspace=stack.workspace,
        predlog_url=stack.env["OPSLOOP_PREDLOG_URL"],
        min_improvement=0.99,
        overrides=f"data.processed_dir={stack.processed} data.min_labels=30 trainer.max_epochs=2",
    )
    history = History(settings.resolved_db_url())
    run_id = history.create("manual", "a test of the gate", {}, "running")
    history.dispose()
    record = retrain(settings, run_id)
    assert record.state == "refused"
    assert "is not better than champion" in (record.decision or "")
    assert get_version(f"{MODEL}@champion", stack.uri).version == champion
    assert data_version(stack) == before
    assert not (stack.workspace / ".opsloop" / "loop" / f"run-{run_id}").exists()
