"""Ground truth end to end, with a real server, monitor and registry.

A good champion (v1) and a deliberately bad challenger (v2) are registered; `opsloop serve`
follows the registry's `champion`, runs the challenger in shadow and answers a canary share with
it; `opsloop monitor serve` joins the labels that a client posts (some before the answer is
logged, some twice, one invalid) and watches the champion. The test then forces the bad
challenger into `champion` and waits for the watch to move it back — while traffic never stops
and no request fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from opsloop.cli import main
from opsloop.config import OpsloopConfig
from opsloop.data import load_split, prepare_dataset
from opsloop.pipeline import register_run
from opsloop.predictions import read_predictions
from opsloop.registry import download_bundle, get_version, promote_model, promotion_history
from opsloop.serve.state import canary_bucket
from opsloop.tracking import resolve_tracking_uri
from opsloop.train import train_model
from tests.integration.processes import OPSLOOP, free_port, metric_value, running
from tests.support import make_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]
MODEL = "digits-cnn"
CANARY = 0.3


@dataclass
class World:
    cfg: OpsloopConfig
    workspace: Path
    uri: str
    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """v1 (trained) is champion, v2 (one optimisation step) is challenger, with bundles."""
    workspace = tmp_path_factory.mktemp("ground-truth")
    base = ("experiment=tiny", f"workspace={workspace}", "logger.log_model=true")
    cfg = make_config(workspace, *base, "trainer.max_epochs=8")
    prepare_dataset(cfg.data)
    good = train_model(cfg)
    bad_cfg = make_config(workspace, *base, "trainer.max_epochs=1", "trainer.limit_train_batches=1")
    bad = train_model(bad_cfg)
    uri = resolve_tracking_uri(cfg.logger, workspace)
    register_run(cfg, good.run_id or "")
    promote_model(MODEL, cfg.registry, cfg.data, uri, cache_dir=workspace / "cache")
    register_run(cfg, bad.run_id or "")  # v2, alias challenger
    test = load_split(Path(cfg.data.processed_dir) / cfg.data.name, "test")
    return World(cfg, workspace, uri, test.images, test.labels)


@dataclass
class Traffic:
    """A client that keeps sending, labels what it was answered, and counts every failure."""

    base: str
    world: World
    answers: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # id -> answer
    failures: list[str] = field(default_factory=list)
    labelled: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0

    def send(self, client: httpx.Client, request_id: str, index: int) -> None:
        image = self.world.images[index % len(self.world.images)]
        body = {
            "id": request_id,
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, *image.shape],
                    "datatype": "FP32",
                    "data": image.astype(np.float32).ravel().tolist(),
                }
            ],
        }
        try:
            response = client.post(f"{self.base}/v2/models/{MODEL}/infer", json=body)
        except httpx.HTTPError as exc:
            self.failures.append(f"{request_id}: {exc}")
            return
        if response.status_code != 200:
            self.failures.append(f"{request_id}: {response.status_code} {response.text}")
            return
        answer = response.json()
        label = next(o["data"][0] for o in answer["outputs"] if o["name"] == "label")
        role = answer.get("parameters", {}).get("role", "champion")
        self.answers[request_id] = (answer["model_version"], int(label), role)
        self.sent += 1

    def label(self, client: httpx.Client, request_id: str, index: int) -> None:
        truth = int(self.world.labels[index % len(self.world.labels)])
        response = client.post(
            f"{self.base}/feedback", json={"request_id": request_id, "label": truth}
        )
        if response.status_code != 200:
            self.failures.append(f"label {request_id}: {response.status_code} {response.text}")
            return
        self.labelled[request_id] = truth

    def run(self, prefix: str) -> None:
        """Send and label until stopped (the background load during the swaps)."""
        with httpx.Client(timeout=30) as client:
            index = 0
            while not self.stop.is_set():
                request_id = f"{prefix}-{index}"
                self.send(client, request_id, index)
                self.label(client, request_id, index)
                index += 1
                time.sleep(0.02)


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[tuple[str, str, Path]]:
    """`opsloop serve` (registry champion, shadow + canary) and `opsloop monitor serve`."""
    workspace = world.workspace
    predlog = f"sqlite:///{workspace / 'predictions.db'}"
    bundle = workspace / "bundles" / MODEL
    download_bundle(f"{MODEL}@champion", world.uri, bundle)
    serve_port, monitor_port = free_port(), free_port()
    common = {"OPSLOOP_WORKSPACE": str(workspace), "OPSLOOP_PREDLOG_URL": predlog}
    serve_env = common | {
        "OPSLOOP_PORT": str(serve_port),
        "OPSLOOP_SHADOW": "true",
        "OPSLOOP_CANARY_FRACTION": str(CANARY),
        "OPSLOOP_RELOAD_POLL_SECONDS": "1",
        "OPSLOOP_PREDLOG_FLUSH_MS": "50",
    }
    monitor_env = common | {
        "OPSLOOP_MONITOR_PORT": str(monitor_port),
        "OPSLOOP_MONITOR_BUNDLE_PATH": str(bundle),
        "OPSLOOP_MONITOR_INTERVAL_SECONDS": "1",
        "OPSLOOP_MONITOR_MIN_SAMPLES": "20",
        "OPSLOOP_MONITOR_WATCH_MODEL": MODEL,
        "OPSLOOP_MONITOR_WATCH_MIN_LABELS": "30",
        "OPSLOOP_MONITOR_WATCH_MARGIN": "0.05",
    }
    serve_url, monitor_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{monitor_port}"
    with (
        running([*OPSLOOP, "serve"], workspace / "serve.log", serve_env) as server,
        running([*OPSLOOP, "monitor", "serve"], workspace / "monitor.log", monitor_env) as monitor,
    ):
        server.wait_for_http(f"{serve_url}/v2/health/ready")
        monitor.wait_for_http(f"{monitor_url}/health")
        yield serve_url, monitor_url, workspace


def wait_for(condition: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_labels_online_accuracy_shadow_canary_and_rollback(
    world: World, stack: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    serve_url, monitor_url, workspace = stack
    traffic = Traffic(serve_url, world)
    with httpx.Client(timeout=30) as client:
        # A label that arrives before its request is even sent, one posted twice, one invalid.
        traffic.label(client, "early-0", 0)
        traffic.send(client, "early-0", 0)
        for index in range(1, 150):
            traffic.send(client, f"warm-{index}", index)
            traffic.label(client, f"warm-{index}", index)
        wrong = int(traffic.world.labels[1] + 1) % 10
        assert (
            client.post(
                f"{serve_url}/feedback", json={"request_id": "warm-1", "label": wrong}
            ).status_code
            == 200
        )
        traffic.label(client, "warm-1", 1)  # relabelled: the last label wins
        invalid = client.post(f"{serve_url}/feedback", json={"request_id": "x", "label": 99})
        assert invalid.status_code == 422
        assert "not a class of the served model" in invalid.json()["error"]

    # The canary share is the one the request ids pick, and marked; shadows are never returned.
    canaries = {rid for rid, (_, _, role) in traffic.answers.items() if role == "canary"}
    assert canaries == {rid for rid in traffic.answers if canary_bucket(rid) < CANARY}
    assert 0.15 < len(canaries) / len(traffic.answers) < 0.45
    assert all(
        version == ("2" if role == "canary" else "1")
        for version, _, role in traffic.answers.values()
    )

    # Online accuracy on /metrics equals what the labels say about the champion's answers.
    expected_correct = [
        traffic.answers[rid][1] == truth
        for rid, truth in traffic.labelled.items()
        if rid in traffic.answers and traffic.answers[rid][2] == "champion"
    ]
    sample = 'opsloop_online_accuracy{model_version="1",role="champion"}'

    def accuracy_published() -> bool:
        text = httpx.get(f"{monitor_url}/metrics", timeout=5).text
        labelled = 'opsloop_labelled_predictions{model_version="1",role="champion"}'
        return sample in text and metric_value(text, labelled) == len(expected_correct)

    wait_for(accuracy_published, "the monitor to publish online accuracy")
    text = httpx.get(f"{monitor_url}/metrics", timeout=5).text
    assert metric_value(text, sample) == pytest.approx(np.mean(expected_correct))
    assert 'opsloop_online_accuracy{model_version="2",role="shadow"}' in text
    shadow_difference = (
        'opsloop_challenger_accuracy_difference{challenger_version="2",champion_version="1",'
        'role="shadow"}'
    )
    assert metric_value(text, shadow_difference) < 0  # the bad challenger, seen without risk
    assert 'opsloop_estimated_accuracy{method="shift-regression",model_version="1"}' in text

    # Shadow rows are in the log for every champion answer, under version 2.
    logged = read_predictions(f"sqlite:///{workspace / 'predictions.db'}")
    roles = zip(logged.request_ids, logged.roles, strict=True)
    shadow_ids = {request_id for request_id, role in roles if role == "shadow"}
    champion_ids = {rid for rid, (_, _, role) in traffic.answers.items() if role == "champion"}
    assert champion_ids <= shadow_ids

    # One request's chain: the version that answered, its run, commit, data and config, label.
    traced = next(rid for rid, (_, _, role) in traffic.answers.items() if role == "champion")
    predlog = f"sqlite:///{workspace / 'predictions.db'}"
    assert main(["trace", traced, "--log", predlog, *config_overrides(world)]) == 0
    out = capsys.readouterr().out
    v1 = get_version(f"{MODEL}/1", world.uri)
    assert f"model        {MODEL} v1" in out
    assert f"mlflow run   {v1.run_id}" in out
    assert v1.tags["dataset_hash"] in out
    assert f"label        {traffic.labelled[traced]}" in out
    assert "shadow answer" in out  # the challenger's answer to the same request, traced too

    # Force the bad challenger in; the watch must move champion back, under live traffic.
    background = threading.Thread(target=traffic.run, args=("live",), daemon=True)
    background.start()
    try:
        assert main(["promote", "--version", "2", "--force", *config_overrides(world)]) == 0
        assert get_version(f"{MODEL}@champion", world.uri).version == "2"
        wait_for(
            lambda: any(v == "2" and r == "champion" for v, _, r in traffic.answers.values()),
            "the server to swap to v2",
        )
        wait_for(
            lambda: get_version(f"{MODEL}@champion", world.uri).version == "1",
            "the watch to roll back",
            timeout=180,
        )
        rolled_back_at = len(traffic.answers)
        wait_for(
            lambda: any(
                v == "1" and r == "champion"
                for v, _, r in list(traffic.answers.values())[rolled_back_at:]
            ),
            "the server to swap back to v1",
        )
    finally:
        traffic.stop.set()
        background.join(timeout=60)
    assert traffic.failures == []
    last = promotion_history(MODEL, world.uri)[-1]
    assert last["kind"] == "rollback"
    assert last["challenger_version"] == "1"
    assert last["champion_version"] == "2"
    assert "live accuracy" in last["reason"]
    assert last["evidence"]["accuracy"]["new"] < last["evidence"]["accuracy"]["previous"]
    tags = get_version(f"{MODEL}/2", world.uri).tags
    assert tags["promotion.decision"] == "rolled_back"
    text = httpx.get(f"{monitor_url}/metrics", timeout=5).text
    assert metric_value(text, f'opsloop_rollbacks_total{{model="{MODEL}"}}') == 1


def config_overrides(world: World) -> list[str]:
    return [f"workspace={world.workspace}", f"data.processed_dir={world.cfg.data.processed_dir}"]
