"""Real engines for the scale-out tests: PostgreSQL, an S3-compatible server, an MLflow server.

Each is started once per session, on first use, and always stopped at the end:

- `pg_cluster`: a throwaway PostgreSQL cluster (see `tests.integration.postgres`); skipped, with
  the one-line reason, only where PostgreSQL's binaries (or psycopg) are missing.
- `postgres_url`: a fresh, empty database of that cluster for one test (dropped after it); a test
  of any store that lives in PostgreSQL (prediction log, feedback, sweeps, the loop's lock) needs
  only this fixture.
- `s3_server`: moto's S3 server on 127.0.0.1 with dummy credentials.
- `mlflow_server`: `mlflow server` with its backend store in PostgreSQL and its artifacts in an S3
  bucket (proxied: clients need only the tracking URI).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.postgres import PostgresCluster, missing_reason
from tests.integration.processes import Process, free_port

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Never route loopback traffic through a proxy a developer may have configured.
NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
# Hermetic: MLflow 3 would otherwise send usage telemetry from servers and clients.
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the session, stopped (and its directory removed) at the end."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def postgres_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh database for this test (SQLAlchemy URL, password included); dropped afterwards."""
    url = pg_cluster.create_database()
    try:
        yield url
    finally:
        if pg_cluster.running():
            pg_cluster.drop_database(url)


@dataclass(frozen=True)
class S3Server:
    """moto's S3-compatible server: its endpoint and the environment a client needs."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self) -> object:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(proxies={}),
        )


def isolated_env(state: Path, extra: dict[str, str]) -> dict[str, str]:
    """The process env minus a developer's AWS/MLflow settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= (
        NO_PROXY
        | NO_TELEMETRY
        | {
            "AWS_CONFIG_FILE": str(state / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(state / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return env | extra


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """`moto_server` on 127.0.0.1, stopped by PID at the end of the session."""
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.is_file():
        pytest.skip(f"moto_server not found at {binary}: install the dev group (moto[server])")
    directory = tmp_path_factory.mktemp("s3")
    port = free_port()
    command = [str(binary), "-H", "127.0.0.1", "-p", str(port)]
    server = Process(command, directory / "moto.log", isolated_env(directory, S3_CREDENTIALS))
    try:
        server.start().wait_for_http(f"http://127.0.0.1:{port}/moto-api/", timeout=60)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@dataclass(frozen=True)
class MlflowServer:
    """An `mlflow server` on PostgreSQL + S3: what a client needs and what the test inspects."""

    url: str  # the tracking (and registry) URI clients are given
    backend_url: str  # the PostgreSQL database behind it (with the password)
    bucket: str
    artifacts_prefix: str
    process: Process


@pytest.fixture(scope="session")
def mlflow_server(
    pg_cluster: PostgresCluster, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """`mlflow server --backend-store-uri postgresql+psycopg://... --artifacts-destination s3://...`.

    Artifacts are proxied (`mlflow-artifacts:`): the server holds the S3 credentials, clients
    only the tracking URI. Tests share it and keep apart by unique experiment and model names.
    """
    directory = tmp_path_factory.mktemp("mlflow-server")
    bucket = f"opsloop-mlflow-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    backend = pg_cluster.create_database("mlflow")
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", f"s3://{bucket}/artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = isolated_env(directory, s3_server.env)
    server = Process(command, directory / "mlflow-server.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        server.start().wait_until(
            lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, f"{url}/health"
        )
        yield MlflowServer(url, backend, bucket, "artifacts/", server)
    finally:
        server.stop()
