"""The prediction log on PostgreSQL: two servers writing at once, an outage, hidden passwords.

Two `opsloop serve` processes (different ports) log to one PostgreSQL database under concurrent
load: every row a client was answered is there exactly once and the monitor reads the window
back. When the database goes away mid-run (the cluster is stopped, then started), the server keeps
answering, its journal keeps every answer on disk, and the ingester writes them all, in order,
when the database returns; the monitor reports a one-line error meanwhile. No password ever
reaches a log or error.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from opsloop.config import DataConfig
from opsloop.data import dataset_dir, load_split
from opsloop.errors import ConfigError, OpsloopError, PredictionLogError
from opsloop.predictions import NO_LABEL, read_predictions
from opsloop.serve.predlog import LogRecord, PredictionLog, prediction_log
from tests.integration.postgres import PASSWORD, PostgresCluster, missing_reason
from tests.integration.processes import OPSLOOP, Process, free_port, metric_value, running

if TYPE_CHECKING:
    from opsloop.export import ExportResult

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

READY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def digits(trained: tuple[Path, DataConfig]) -> npt.NDArray[np.float32]:
    """Real held-out digits on the model's raw pixel scale (0..16)."""
    return load_split(dataset_dir(trained[1]), "test").images.astype(np.float32)


def label_of(request_id: str) -> int:
    """The label a test's labelling system assigns a request: any class, but a known one."""
    return int(request_id.rsplit("r", 1)[1]) % 10


def serve_env(bundle: Path, tmp_path: Path, predlog_url: str, port: int) -> dict[str, str]:
    return {
        "OPSLOOP_BUNDLE_PATH": str(bundle),
        "OPSLOOP_HOST": "127.0.0.1",
        "OPSLOOP_PORT": str(port),
        "OPSLOOP_WORKERS": "1",
        "OPSLOOP_WORKSPACE": str(tmp_path),
        "OPSLOOP_PREDLOG_URL": predlog_url,
        "OPSLOOP_PREDLOG_FLUSH_MS": "50",
        "OPSLOOP_RELOAD_POLL_SECONDS": "0",
    }


@contextlib.contextmanager
def servers(
    bundle: Path, tmp_path: Path, predlog_url: str, count: int, **extra: str
) -> Iterator[list[tuple[Process, str]]]:
    """`count` servers started at the same moment (they race to create the tables)."""
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(count):
            port = free_port()
            env = serve_env(bundle, tmp_path, predlog_url, port) | extra
            process = stack.enter_context(
                running([*OPSLOOP, "serve"], tmp_path / f"serve-{port}.log", env)
            )
            started.append((process, f"http://127.0.0.1:{port}"))
        for process, url in started:
            process.wait_for_http(f"{url}/v2/health/ready", timeout=READY_TIMEOUT_S)
        yield started


def infer(client: httpx.Client, url: str, pixels: npt.NDArray[np.float32], rid: str) -> Any:
    body = {
        "id": rid,
        "inputs": [
            {
                "name": "pixels",
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "data": pixels.ravel().tolist(),
            }
        ],
    }
    response = client.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == rid
    return answer


def metric(url: str, sample: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics", timeout=10).text, sample)


def wait_until(what: str, condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout:.0f}s: {what}"
        time.sleep(0.2)


def test_two_servers_log_every_answer_once_and_the_monitor_reads_it(
    postgres_url: str, bundle: ExportResult, digits: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    from opsloop.monitor.service import check_once

    with servers(bundle.path, tmp_path, postgres_url, 2) as started:
        urls = [url for _, url in started]
        jobs = [(f"s{i % 2}-r{i}", urls[i % 2], 1 + i % 4) for i in range(240)]
        cursor = itertools.count()

        def send(job: tuple[str, str, int]) -> tuple[str, list[int]]:
            rid, url, rows = job
            start = next(cursor) * 3 % (len(digits) - 4)
            with httpx.Client() as client:
                answer = infer(client, url, digits[start : start + rows], rid)
                # The label arrives at the other replica, often before the row is flushed.
                other = urls[1 - urls.index(url)]
                label = {"request_id": rid, "item": rows - 1, "label": label_of(rid)}
                posted = client.post(f"{other}/feedback", json=label, timeout=30)
                assert posted.status_code == 200, posted.text
            probabilities = np.array(answer["outputs"][0]["data"]).reshape(rows, -1)
            return rid, probabilities.argmax(axis=1).tolist()

        with ThreadPoolExecutor(max_workers=8) as pool:  # both servers under load at once
            answered = dict(pool.map(send, jobs))
        per_server = [sum(rows for _, url, rows in jobs if url == u) for u in urls]
        for url, rows in zip(urls, per_server, strict=True):
            wait_until(
                f"{url} wrote the {rows} rows it answered",
                lambda u=url, n=rows: metric(u, "opsloop_predlog_rows_total") == n,
            )
            assert metric(url, "opsloop_predlog_dropped_rows_total") == 0
    for process, _ in started:
        # A graceful, unblocked shutdown (uvicorn re-raises the SIGTERM it handled).
        assert "Application shutdown complete" in process.log()
        assert PASSWORD not in process.log()
        assert "Traceback" not in process.log()

    logged = read_predictions(postgres_url)
    expected = Counter(
        (rid, item) for rid, labels in answered.items() for item in range(len(labels))
    )
    assert len(logged) == sum(per_server) == sum(expected.values())
    assert Counter(zip(logged.request_ids, logged.items.tolist(), strict=True)) == expected
    keys = list(zip(logged.request_ids, logged.items.tolist(), strict=True))
    logged_labels = dict(zip(keys, logged.labels.tolist(), strict=True))
    for rid, labels in answered.items():  # what was logged is what the client was answered
        assert [logged_labels[(rid, item)] for item in range(len(labels))] == labels
    assert set(logged.model_versions) == {bundle.manifest.model_version}
    # Each request's last row carries the label posted (to the other server) for it.
    true_labels = dict(zip(keys, logged.true_labels.tolist(), strict=True))
    for rid, labels in answered.items():
        last = len(labels) - 1
        assert true_labels[(rid, last)] == label_of(rid)
        assert all(true_labels[(rid, item)] == NO_LABEL for item in range(last))

    report = check_once(bundle.path, postgres_url, last=len(logged))
    assert report.window_size == len(logged)
    assert report.model_versions == {bundle.manifest.model_version: len(logged)}
    assert report.source.startswith("postgresql+psycopg://opsloop:***@127.0.0.1:")


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: it stops it mid-run, and no other test may see that."""
    if (reason := missing_reason()) is not None:
        pytest.skip(reason)
    cluster = PostgresCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_a_database_outage_keeps_answers_flowing_and_loses_no_row(
    own_cluster: PostgresCluster,
    bundle: ExportResult,
    digits: npt.NDArray[np.float32],
    tmp_path: Path,
) -> None:
    before, during = 20, 60
    cluster = own_cluster
    url = cluster.create_database("outage")
    extra = {"OPSLOOP_PREDLOG_CONNECT_TIMEOUT_S": "2"}
    with servers(bundle.path, tmp_path, url, 1, **extra) as [(server, serve_url)]:
        with monitor_service(bundle.path, url, tmp_path) as (monitor, monitor_url):
            run_outage(cluster, url, serve_url, monitor_url, digits, before, during)
            assert "Traceback" not in monitor.log()
            assert PASSWORD not in monitor.log()
        assert metric(serve_url, "opsloop_predlog_dropped_rows_total") == 0
    assert PASSWORD not in server.log()
    assert "Traceback" not in server.log()


@contextlib.contextmanager
def monitor_service(bundle: Path, url: str, tmp_path: Path) -> Iterator[tuple[Process, str]]:
    port = free_port()
    env = {
        "OPSLOOP_MONITOR_PORT": str(port),
        "OPSLOOP_MONITOR_INTERVAL_SECONDS": "0.5",
        "OPSLOOP_MONITOR_MIN_SAMPLES": "10",
        "OPSLOOP_MONITOR_REPORT_DIR": str(tmp_path / "reports"),
    }
    command = [*OPSLOOP, "monitor", "serve", "--bundle", str(bundle), "--log", url]
    with running(command, tmp_path / f"monitor-{port}.log", env) as process:
        monitor_url = f"http://127.0.0.1:{port}"
        process.wait_for_http(f"{monitor_url}/health", timeout=READY_TIMEOUT_S)
        yield process, monitor_url


def run_outage(
    cluster: PostgresCluster,
    url: str,
    serve_url: str,
    monitor_url: str,
    digits: npt.NDArray[np.float32],
    before: int,
    during: int,
) -> None:
    def health() -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{monitor_url}/health", timeout=10).json()
        return body

    with httpx.Client() as client:
        for i in range(before):
            infer(client, serve_url, digits[i : i + 1], f"before-{i}")
        wait_until("rows before", lambda: len(read_predictions(url)) == before)
        wait_until("monitor healthy", lambda: health()["healthy"])

        cluster.stop()
        for i in range(during):  # every request is still answered (and journaled on disk)
            infer(client, serve_url, digits[i : i + 1], f"during-{i}")
        assert httpx.get(f"{serve_url}/v2/health/ready", timeout=10).status_code == 200
        label = {"request_id": "during-0", "label": 3}
        refused = client.post(f"{serve_url}/feedback", json=label, timeout=30)
        assert refused.status_code == 503  # a label cannot wait in memory: the client retries
        assert "retry later" in refused.json()["error"]
        wait_until(
            "monitor reports the outage",
            lambda: health()["last_error_reason"] == "log_unavailable",
        )
        error = health()["last_error"]
        assert error.startswith("cannot read the prediction log postgresql+psycopg://opsloop:***@")
        assert "\n" not in error
        assert PASSWORD not in error
        assert metric(serve_url, "opsloop_predlog_rows_total") == before  # nothing written yet

        cluster.start()
        wait_until(
            "journaled rows written after the database came back",
            lambda: metric(serve_url, "opsloop_predlog_rows_total") == before + during,
        )
        wait_until("monitor recovers", lambda: health()["healthy"])
        label = {"request_id": f"during-{during - 1}", "label": 3}
        assert client.post(f"{serve_url}/feedback", json=label, timeout=30).status_code == 200
    logged = read_predictions(url)
    everything = [f"before-{i}" for i in range(before)] + [f"during-{i}" for i in range(during)]
    assert logged.request_ids == everything  # every answer, once, in order
    assert logged.true_labels.tolist() == [NO_LABEL] * (len(logged) - 1) + [3]


def test_database_errors_never_show_the_password(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsloop.sweep.study import open_storage

    wrong = postgres_url.replace(PASSWORD, "not-the-password")
    with pytest.raises(ConfigError) as opened:
        PredictionLog(wrong).start()
    with pytest.raises(PredictionLogError) as read:
        read_predictions(wrong)
    with pytest.raises(OpsloopError) as storage:
        open_storage(wrong)
    for exc in (opened.value, read.value, storage.value):
        message = str(exc)
        assert "opsloop:***@127.0.0.1" in message
        assert "not-the-password" not in message
        assert "password authentication failed" in message  # the real reason, kept

    # Better still, no password in the URL at all: libpq reads it from PGPASSWORD (or ~/.pgpass).
    with prediction_log(postgres_url) as log:
        log.append(one_record())
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert read_predictions(postgres_url.replace(f":{PASSWORD}@", "@")).request_ids == ["r1"]


def one_record() -> LogRecord:
    probabilities = np.full((1, 10), 0.1, dtype=np.float32)
    return LogRecord(
        request_id="r1",
        created_at=time.time(),
        endpoint="infer",
        model_name="digits",
        model_version="1",
        inputs=np.zeros((1, 1, 8, 8), dtype=np.float32),
        probabilities=probabilities,
        embedding=np.zeros((1, 16), dtype=np.float32),
        latency_ms=1.0,
    )


def test_replicas_starting_together_all_find_the_tables(postgres_url: str) -> None:
    """Concurrent CREATE TABLEs: PostgreSQL fails the losers (a catalog unique violation)."""
    barrier = threading.Barrier(6)

    def start() -> int:
        log = PredictionLog(postgres_url)
        barrier.wait()
        log.start()  # a ConfigError here would stop a replica from starting
        log.append(one_record())
        log.close()
        return log.rows_written

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(lambda _: start(), range(6))) == [1] * 6
    assert len(read_predictions(postgres_url)) == 6
