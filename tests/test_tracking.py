"""Tracking helpers against a real SQLite MLflow store and real loopback HTTP servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from opsloop.config import LoggerConfig
from opsloop.errors import ModelNotFoundError, TrackingError
from opsloop.tracking import (
    TRACKING_URI_ENV,
    MlflowTracker,
    NullTracker,
    WandbTracker,
    artifact_root,
    check_tracking_reachable,
    checkpoint_for_run,
    connect_tracking_store,
    create_run,
    ensure_experiment,
    finish_run,
    log_artifacts_to_run,
    log_metrics_to_run,
    log_params_to_run,
    make_tracker,
    reopen_run,
    resolve_tracking_uri,
    run_lineage,
    set_run_tags,
)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)


def sqlite_uri(workspace: Path) -> str:
    return resolve_tracking_uri(LoggerConfig(), workspace)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real SQLite store for the module: creating its schema takes seconds."""
    workspace = tmp_path_factory.mktemp("store")
    return workspace, sqlite_uri(workspace)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[int]]]:
    """A real HTTP server on 127.0.0.1 whose /health answers the status in the returned list."""
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0] if self.path == "/health" else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", status
    finally:
        server.shutdown()
        server.server_close()


def test_uri_precedence_env_then_config_then_workspace_store(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = resolve_tracking_uri(LoggerConfig(), workspace)
    assert default == f"sqlite:///{workspace.resolve()}/mlflow.db"
    configured = LoggerConfig(tracking_uri="http://mlflow:5000")
    assert resolve_tracking_uri(configured, workspace) == "http://mlflow:5000"
    monkeypatch.setenv(TRACKING_URI_ENV, "http://tracking.example:80")
    assert resolve_tracking_uri(configured, workspace) == "http://tracking.example:80"


def test_artifact_root_is_absolute_in_the_workspace(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace.parent)
    assert artifact_root(Path(workspace.name)) == workspace.resolve() / "mlartifacts"


def test_closed_port_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingError, match=rf"cannot reach the tracking server at {uri}.*unset"):
        check_tracking_reachable(uri)
    assert time.perf_counter() - started < 5


def test_healthy_server_passes_and_unhealthy_fails(
    health_server: tuple[str, list[int]],
) -> None:
    uri, status = health_server
    check_tracking_reachable(uri)
    check_tracking_reachable(uri + "/")
    status[0] = 503
    with pytest.raises(TrackingError, match=r"503"):
        check_tracking_reachable(uri)


def test_sqlite_store_directory_is_created(tmp_path: Path) -> None:
    check_tracking_reachable(f"sqlite:///{tmp_path / 'new' / 'dir' / 'mlflow.db'}")
    assert (tmp_path / "new" / "dir").is_dir()


def test_sqlite_store_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackingError, match=r"cannot create the tracking store's directory"):
        check_tracking_reachable(f"sqlite:///{blocker / 'mlflow.db'}")


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns"])
def test_file_store_is_refused_unless_allowed(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match=r"maintenance mode.*sqlite:///"):
        check_tracking_reachable(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_reachable(uri)


def test_run_helpers_round_trip_through_the_sqlite_store(store: tuple[Path, str]) -> None:
    from mlflow.tracking import MlflowClient

    workspace, uri = store
    experiment_id = ensure_experiment(LoggerConfig(experiment="helpers"), workspace)
    assert ensure_experiment(LoggerConfig(experiment="helpers"), workspace) == experiment_id
    parent = create_run(uri, workspace, experiment="helpers", run_name="parent")
    child = create_run(
        uri, workspace, experiment="helpers", tags={"seed": "7"}, parent_run_id=parent
    )
    log_params_to_run(child, uri, {f"p{i}": i for i in range(150)})  # more than one batch
    log_metrics_to_run(child, uri, {"eval/acc": 0.5})
    report = workspace / "report"
    report.mkdir(exist_ok=True)
    (report / "metrics.json").write_text("{}")
    log_artifacts_to_run(child, uri, report, "evaluation")
    finish_run(child, uri)

    client = MlflowClient(uri)
    run = client.get_run(child)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert len(run.data.params) == 150
    assert run.data.metrics["eval/acc"] == pytest.approx(0.5)
    assert [a.path for a in client.list_artifacts(child, "evaluation")] == [
        "evaluation/metrics.json"
    ]
    assert run_lineage(child, uri) == {"seed": "7"}
    experiment = client.get_experiment(experiment_id)
    assert experiment.artifact_location == artifact_root(workspace).as_uri()
    assert (artifact_root(workspace) / child / "artifacts" / "evaluation").is_dir()


def test_tags_status_and_reopening_of_an_existing_run(store: tuple[Path, str]) -> None:
    from mlflow.tracking import MlflowClient

    workspace, uri = store
    run_id = create_run(uri, workspace, experiment="reopened", tags={"kept": "yes"})
    set_run_tags(run_id, uri, {"optuna.state": "PRUNED", "best.optim.lr": "0.01"})
    finish_run(run_id, uri, "KILLED")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["best.optim.lr"] == "0.01"
    assert run.data.tags["kept"] == "yes"
    assert reopen_run(run_id, uri) is True
    assert client.get_run(run_id).info.status == "RUNNING"
    assert reopen_run("no-such-run", uri) is False  # another store's run: start a new one here


def test_tagging_an_unknown_run_is_a_one_line_tracking_error(store: tuple[Path, str]) -> None:
    _, uri = store
    with pytest.raises(TrackingError, match=rf"the tracking store {uri} refused a request: \S"):
        set_run_tags("no-such-run", uri, {"a": "b"})
    with pytest.raises(TrackingError, match=r"refused a request") as info:
        finish_run("no-such-run", uri, "KILLED")
    assert "\n" not in str(info.value)


def test_connecting_creates_a_new_sqlite_store_at_once(tmp_path: Path) -> None:
    database = tmp_path / "fresh" / "mlflow.db"
    uri = f"sqlite:///{database}"
    check_tracking_reachable(uri)  # makes the directory, as training does first
    assert not database.exists()
    connect_tracking_store(uri)
    assert database.is_file()
    connect_tracking_store(uri)  # an existing store is just opened


def test_an_unusable_store_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    with pytest.raises(
        TrackingError, match=r"cannot open the tracking store .*OPSLOOP_TRACKING_URI"
    ) as info:
        connect_tracking_store(uri)
    assert str(blocker) in str(info.value)
    assert "\n" not in str(info.value)


def test_checkpoint_for_run_downloads_the_best_checkpoint(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    workspace, uri = store
    run_id = create_run(uri, workspace, experiment="opsloop")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "best.ckpt").write_bytes(b"weights")
    log_artifacts_to_run(run_id, uri, checkpoints, "checkpoints")
    local = checkpoint_for_run(run_id, uri, tmp_path / "download")
    assert local.read_bytes() == b"weights"
    assert local.is_relative_to(tmp_path / "download")


def test_checkpoint_for_unknown_run_or_run_without_one(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    workspace, uri = store
    with pytest.raises(ModelNotFoundError, match=r"no MLflow run 'nope'") as info:
        checkpoint_for_run("nope", uri, tmp_path / "download")
    assert "\n" not in str(info.value)
    empty = create_run(uri, workspace, experiment="opsloop")
    with pytest.raises(ModelNotFoundError, match=r"has no checkpoints/best.ckpt artifact"):
        checkpoint_for_run(empty, uri, tmp_path / "download")
    with pytest.raises(ModelNotFoundError, match=r"no MLflow run"):
        log_metrics_to_run("nope", uri, {"x": 1.0})


def test_make_tracker_follows_logger_name(workspace: Path) -> None:
    assert isinstance(make_tracker(LoggerConfig(name="mlflow"), workspace), MlflowTracker)
    assert isinstance(make_tracker(LoggerConfig(name="wandb"), workspace), WandbTracker)
    assert isinstance(make_tracker(LoggerConfig(name="none"), workspace), NullTracker)


def test_null_tracker_is_inert(workspace: Path) -> None:
    tracker = NullTracker()
    tracker.check_reachable()
    assert tracker.lightning_logger() is False
    assert tracker.for_rank(True) is tracker
    assert tracker.start() is None
    tracker.log_params({"a": 1})
    tracker.set_tags({"a": "b"})
    tracker.log_metrics({"a": 1.0})
    tracker.log_artifact(workspace, "x")
    tracker.finish("FAILED")
    assert tracker.run_id is None
    assert list(workspace.iterdir()) == []


def test_mlflow_tracker_is_null_off_rank_zero(workspace: Path) -> None:
    tracker = make_tracker(LoggerConfig(name="mlflow"), workspace)
    assert isinstance(tracker.for_rank(False), NullTracker)
    assert tracker.for_rank(True) is tracker
    tracker.finish("FAILED")  # never started: nothing to end, nothing created
    assert tracker.run_id is None
    # Nothing touched the store yet: a run is created only when rank zero starts one.
    assert not (workspace / "mlflow.db").exists()
