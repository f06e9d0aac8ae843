"""The whole loop against an MLflow tracking server on PostgreSQL with artifacts on S3.

`opsloop pipeline`, `register`, `promote` and `models` run as real commands whose only tie to the
server is `OPSLOOP_TRACKING_URI` (no AWS credentials: the server proxies the artifacts); `opsloop
serve` follows the `champion` alias from the same server, through a promotion and a rollback, and
the registry reads the loop and the rollback watch use (`opsloop.registry`) answer from it. The
test looks behind the server too: the registry lives in PostgreSQL's tables and the checkpoint,
logged model and bundles are objects in the S3 bucket. Without a server, MLflow may use the
database itself: then its password never shows either.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from opsloop.registry import get_version, list_versions, promotion_history
from opsloop.registry.gate import last_promotion, rollback_champion
from tests.integration.conftest import NO_TELEMETRY, MlflowServer, S3Server
from tests.integration.postgres import PASSWORD
from tests.integration.processes import OPSLOOP, free_port, running
from tests.support import CONFIG_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

READY_TIMEOUT_S = 180
FOLLOW_TIMEOUT_S = 60


def client_env(tracking_uri: str, workspace: Path) -> dict[str, str]:
    """What a team member's shell needs: the tracking URI, and no S3 credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.pop("OPSLOOP_TRACKING_URI", None)
    return (
        env
        | NO_TELEMETRY
        | {
            "OPSLOOP_TRACKING_URI": tracking_uri,
            "OPSLOOP_CONFIG_DIR": str(CONFIG_DIR),
            "OPSLOOP_WORKSPACE": str(workspace),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )


def opsloop(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run one `opsloop` command; fail the test with its output unless it exits 0."""
    done = subprocess.run(
        [*OPSLOOP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"opsloop {args[0]} exited {done.returncode}:\n{done.stderr}"
    assert PASSWORD not in done.stdout + done.stderr
    return done.stdout


def served_version(url: str, name: str) -> str | None:
    response = httpx.get(f"{url}/v2/models/{name}", timeout=5)
    if response.status_code != 200:
        return None
    versions: list[str] = response.json()["versions"]
    return versions[0]


def test_pipeline_promote_and_serve_against_an_mlflow_server(
    mlflow_server: MlflowServer, s3_server: S3Server, tmp_path: Path
) -> None:
    name = f"digits-{uuid.uuid4().hex[:8]}"  # the server is shared: keep this test's names apart
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = client_env(mlflow_server.url, workspace)
    overrides = [
        f"registry.model_name={name}",
        f"logger.experiment={name}",
        f"workspace={workspace}",
        f"data.processed_dir={tmp_path / 'processed'}",
        f"data.cache_dir={tmp_path / 'raw'}",
    ]
    summary = opsloop(env, workspace, "pipeline", "experiment=tiny", *overrides)
    assert "champion" in summary
    first = get_version(f"{name}@champion", mlflow_server.url)
    assert first.version == "1"
    assert first.run_id is not None

    # The registry and the runs are rows in PostgreSQL; the artifacts are objects in S3.
    engine = create_engine(mlflow_server.backend_url)
    try:
        with engine.connect() as connection:
            aliases = connection.execute(
                text("SELECT alias, version FROM registered_model_aliases WHERE name = :n"),
                {"n": name},
            ).all()
            run_status = connection.execute(
                text("SELECT status FROM runs WHERE run_uuid = :r"), {"r": first.run_id}
            ).scalar_one()
    finally:
        engine.dispose()
    assert ("champion", 1) in [(alias, int(version)) for alias, version in aliases]
    assert run_status == "FINISHED"
    keys = object_keys(s3_server, mlflow_server.bucket)
    run_keys = [key for key in keys if f"/{first.run_id}/" in key]
    assert any(key.endswith("/checkpoints/best.ckpt") for key in run_keys)
    assert any(key.endswith("/bundles/v1/bundle.json") for key in run_keys)
    assert any(key.endswith("/bundles/v1/model.onnx") for key in run_keys)

    serve_workspace = tmp_path / "serve"  # an empty bundle cache: every bundle comes from S3
    port = free_port()
    serve_env = client_env(mlflow_server.url, serve_workspace) | {
        "OPSLOOP_MODEL_NAME": name,
        "OPSLOOP_PORT": str(port),
        "OPSLOOP_RELOAD_POLL_SECONDS": "1",
        "OPSLOOP_PREDLOG_URL": "none",
    }
    url = f"http://127.0.0.1:{port}"
    with running([*OPSLOOP, "serve"], tmp_path / "serve.log", serve_env) as server:
        server.wait_for_http(f"{url}/v2/health/ready", timeout=READY_TIMEOUT_S)
        assert served_version(url, name) == "1"

        # A second version of the same run: the gate scores both bundles (fetched from S3
        # through the server) on the holdout and, equal in accuracy, promotes it.
        registered = opsloop(env, workspace, "register", "--run-id", first.run_id, *overrides)
        assert f"registered {name} v2" in registered
        promoted = opsloop(env, workspace, "promote", *overrides)
        assert f"{name} v2: promoted" in promoted
        listed = opsloop(env, workspace, "models", "list", *overrides)
        assert "v2" in listed
        assert "champion" in listed

        server.wait_until(lambda: served_version(url, name) == "2", "serve follows champion")
        answer = infer(url, name)
        assert answer["model_version"] == "2"

        # The rollback watch's registry reads and writes, on the server: the last move, undone.
        last = last_promotion(name, mlflow_server.url)
        assert last is not None
        assert (last["challenger_version"], last["champion_version"]) == ("2", "1")
        rollback_champion(name, "1", "worse live", mlflow_server.url)
        server.wait_until(lambda: served_version(url, name) == "1", "serve follows a rollback")
    assert "Traceback" not in server.log()

    # The registry reads the loop makes, straight from the server.
    assert get_version(f"{name}@champion", mlflow_server.url).version == "1"
    assert [v.version for v in list_versions(name, mlflow_server.url)] == ["2", "1"]
    history = promotion_history(name, mlflow_server.url)
    moves = [(e["challenger_version"], e["promoted"]) for e in history]
    assert moves == [("1", True), ("2", True), ("1", True)]
    assert history[-1]["reason"] == "rolled back from v2: worse live"
    keys = object_keys(s3_server, mlflow_server.bucket)
    assert any(key.endswith("/bundles/v2/bundle.json") for key in keys)
    assert PASSWORD not in mlflow_server.process.log()


def infer(url: str, name: str) -> dict[str, Any]:
    pixels = np.zeros((1, 1, 8, 8), dtype=np.float32)
    tensor = {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32"}
    body = {"inputs": [tensor | {"data": pixels.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def object_keys(s3: S3Server, bucket: str) -> list[str]:
    client: Any = s3.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def test_mlflow_straight_on_postgresql_never_shows_the_password(
    postgres_url: str, tmp_path: Path
) -> None:
    """Without a server, the tracking URI may be the database itself (password included)."""
    from mlflow.tracking import MlflowClient

    from tests.support import prepare_digits

    processed = prepare_digits(tmp_path / "processed").parent
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = client_env(postgres_url, workspace)
    del env["OPSLOOP_TRACKING_URI"]  # in the config this time: it is saved and logged with the run
    trained = opsloop(
        env, workspace, "train", "experiment=tiny", "logger.log_model=false",
        f"logger.tracking_uri={postgres_url}",
        f"workspace={workspace}", f"data.processed_dir={processed}",
    )  # fmt: skip
    assert "postgresql+psycopg://opsloop:***@127.0.0.1:" in trained  # where it was tracked
    listed = opsloop(env, workspace, "models", "list", f"logger.tracking_uri={postgres_url}")
    assert "no registered models" in listed
    client = MlflowClient(postgres_url)
    [run] = client.search_runs([client.get_experiment_by_name("opsloop").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["logger.tracking_uri"].startswith("postgresql+psycopg://opsloop:***@")
    assert PASSWORD not in str(run.data.params) + str(run.data.tags)
    [run_dir] = (workspace / "outputs").iterdir()
    assert PASSWORD not in (run_dir / "config.yaml").read_text()
