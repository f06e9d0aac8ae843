"""DVC round trips of a prepared dataset: `dvc add` -> push -> lose everything local -> pull.

Each test builds a throwaway git + DVC repo under tmp_path, prepares the digits dataset into it and
checks that the pulled files are byte-identical. One remote is a local directory (the default), the
other S3, served by moto's S3-compatible server on 127.0.0.1. DVC runs as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from opsloop.config import load_config
from opsloop.data import DataResult, prepare_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("dvc", reason="dvc is needed: install the train extra")

DATA_REL = Path("data") / "processed" / "digits"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def isolated_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The process env minus a developer's AWS/DVC/git settings, with every state dir in tmp."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "DVC_", "GIT_"))
    }
    state = tmp_path / "state"
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(state / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(state / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(state / "dvc-site-cache"),
        GIT_CONFIG_GLOBAL=str(state / "gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        # Never route loopback traffic through a proxy a developer may have configured.
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        AWS_CONFIG_FILE=str(state / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(state / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command, failing the test with its output if it exits non-zero."""
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


def dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], repo, env)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its bytes."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # DVC addresses its cache and remotes by MD5


@dataclass(frozen=True)
class TrackedDataset:
    """A prepared dataset `dvc add`ed in a fresh repo, with what it looked like before any push."""

    repo: Path
    data_dir: Path
    result: DataResult
    files: dict[str, bytes]
    dir_md5: str  # "<md5>.dir", as the .dvc pointer file records it

    def remote_keys(self) -> set[str]:
        """The content-addressed paths (relative to the remote root) DVC 3 must push."""
        # The directory listing is stored as one more object, named `<md5>.dir`.
        hashes = {md5_hex(data) for data in self.files.values()} | {self.dir_md5}
        return {f"files/md5/{h[:2]}/{h[2:]}" for h in hashes}


def make_tracked_dataset(tmp_path: Path, env: dict[str, str]) -> TrackedDataset:
    """git init + dvc init a repo, prepare digits into it and `dvc add` the dataset directory."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo, env)
    dvc(repo, env, "init", "-q")
    dvc(repo, env, "config", "core.analytics", "false")

    base = load_config(["data=digits"]).data
    cfg = replace(
        base,
        name="digits",
        source="digits",
        processed_dir=str(repo / "data" / "processed"),
        cache_dir=str(tmp_path / "raw"),
    )
    result = prepare_dataset(cfg)
    data_dir = repo / DATA_REL
    assert result.written
    assert result.path.resolve() == data_dir.resolve()
    assert sum(result.counts.values()) == 1797  # scikit-learn's digits, all of them

    files = snapshot(data_dir)
    expected = {f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("images", "labels")}
    assert set(files) == expected | {"manifest.json"}
    assert json.loads(files["manifest.json"])["content_hash"] == result.content_hash

    dvc(repo, env, "add", DATA_REL.as_posix())
    pointer = (repo / DATA_REL).with_suffix(".dvc").read_text()
    assert (repo / "data" / "processed" / ".gitignore").read_text().strip() == "/digits"
    dir_line = next(line for line in pointer.splitlines() if "md5:" in line)
    dir_md5 = dir_line.split("md5:", 1)[1].strip()
    assert dir_md5.endswith(".dir")
    return TrackedDataset(repo, data_dir, result, files, dir_md5)


def lose_local_copies(tracked: TrackedDataset) -> None:
    """Delete the DVC cache and the workspace data: only the remote still has the bytes."""
    shutil.rmtree(tracked.repo / ".dvc" / "cache")
    shutil.rmtree(tracked.data_dir)
    assert not tracked.data_dir.exists()


def assert_restored(tracked: TrackedDataset) -> None:
    """The pulled dataset is byte-for-byte what was added, with the same content hash."""
    assert tracked.data_dir.is_dir()
    restored = snapshot(tracked.data_dir)
    assert restored.keys() == tracked.files.keys()
    for name, data in tracked.files.items():
        assert restored[name] == data, f"{name} differs after pull"
    manifest = json.loads(restored["manifest.json"])
    assert manifest["content_hash"] == tracked.result.content_hash


def test_local_directory_remote_round_trip(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    tracked = make_tracked_dataset(tmp_path, env)
    remote = tmp_path / "remote-storage"
    dvc(tracked.repo, env, "remote", "add", "-d", "local", str(remote))

    dvc(tracked.repo, env, "push")
    pushed = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert pushed == tracked.remote_keys()
    assert "Cache and remote 'local' are in sync" in dvc(tracked.repo, env, "status", "--cloud")

    lose_local_copies(tracked)
    dvc(tracked.repo, env, "pull")
    assert_restored(tracked)


# --- S3, against moto's S3-compatible server on loopback ------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `moto_server` on 127.0.0.1; yields its endpoint URL and always stops it by PID."""
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.is_file():
        pytest.skip(f"moto_server not found at {binary}: install the dev group (moto[server])")
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    endpoint = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=isolated_env(log_path.parent),
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited {proc.returncode}: {log_path.read_text()}")
            try:
                with opener.open(f"{endpoint}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer in 60 s: {log_path.read_text()}")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def s3_client(endpoint: str) -> Any:
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=DUMMY_CREDENTIALS["AWS_SESSION_TOKEN"],
        config=Config(proxies={}),
    )


def test_s3_remote_round_trip_against_moto(tmp_path: Path, moto_endpoint: str) -> None:
    pytest.importorskip("dvc_s3", reason="dvc-s3 is needed for s3:// remotes")
    env = isolated_env(tmp_path, DUMMY_CREDENTIALS)
    s3 = s3_client(moto_endpoint)
    bucket = f"opsloop-dvc-{tmp_path.name.lower().replace('_', '-')}"[:63].rstrip("-")
    s3.create_bucket(Bucket=bucket)

    tracked = make_tracked_dataset(tmp_path, env)
    dvc(tracked.repo, env, "remote", "add", "-d", "s3", f"s3://{bucket}/store")
    dvc(tracked.repo, env, "remote", "modify", "s3", "endpointurl", moto_endpoint)

    dvc(tracked.repo, env, "push")
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="store/")
    keys = {obj["Key"].removeprefix("store/") for obj in listing.get("Contents", [])}
    assert keys == tracked.remote_keys()
    assert all(obj["Size"] > 0 for obj in listing["Contents"])

    lose_local_copies(tracked)
    dvc(tracked.repo, env, "pull")
    assert_restored(tracked)
