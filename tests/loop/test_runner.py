"""Where a run's work starts: the Kubernetes Job rendered from the repository's template and
created with kubectl, and a CI dispatch posted to an HTTP API.

No cluster and no GitHub are reachable here: kubectl is a stand-in script that keeps what it is
given, and the dispatch goes to an HTTP server on 127.0.0.1 that keeps what it receives.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from opsloop.errors import ConfigError
from opsloop.loop.runner import DispatchRunner, KubernetesRunner, job_manifest
from opsloop.loop.settings import load_loop_settings

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "k8s" / "base" / "retrain.yaml"


def test_the_job_runs_the_work_in_the_templates_container() -> None:
    job = job_manifest(TEMPLATE, 7)
    assert job["kind"] == "Job"
    assert job["metadata"]["name"].endswith("-run-7")
    assert job["metadata"]["labels"]["opsloop.io/loop-run"] == "7"
    [container, *_] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["loop", "retrain", "--run", "7"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_kubectl_gets_the_rendered_job(tmp_path: Path) -> None:
    kept = tmp_path / "created.yaml"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = 'create -f -' ] || exit 3\ncat > {kept}\n")
    kubectl.chmod(0o755)
    settings = load_loop_settings(runner="kubernetes", kubectl=str(kubectl), job_template=TEMPLATE)
    KubernetesRunner(settings).start(12)
    created = yaml.safe_load(kept.read_text())
    assert created["metadata"]["name"].endswith("-run-12")
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'forbidden: jobs' >&2\nexit 1\n")
    failing.chmod(0o755)
    broken = settings.model_copy(update={"kubectl": str(failing)})
    with pytest.raises(Exception, match="forbidden: jobs"):
        KubernetesRunner(broken).start(13)


def test_a_cronjob_template_is_read_from_the_cluster(tmp_path: Path) -> None:
    # What `kubectl get cronjob/opsloop-retrain -o json` prints in a cluster: the CronJob as
    # applied (the overlay's image), with the fields the server adds.
    cronjob = yaml.safe_load(TEMPLATE.read_text())
    cronjob["metadata"] |= {"namespace": "opsloop", "uid": "u-1", "resourceVersion": "42"}
    [container] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    container["image"] = "ghcr.io/opsloop/opsloop-train:0.1.0"
    cronjob["status"] = {"lastScheduleTime": None}
    calls = tmp_path / "calls"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'[ "$1" = get ] && cat {tmp_path / "cronjob.json"} && exit 0\n'
        f"cat > {tmp_path / 'created.yaml'}\n"
    )
    kubectl.chmod(0o755)
    (tmp_path / "cronjob.json").write_text(json.dumps(cronjob))
    settings = load_loop_settings(
        runner="kubernetes", kubectl=str(kubectl), job_template="cronjob/opsloop-retrain"
    )
    KubernetesRunner(settings).start(3)
    assert calls.read_text().splitlines() == [
        "get cronjob/opsloop-retrain --output json",
        "create -f -",
    ]
    job = yaml.safe_load((tmp_path / "created.yaml").read_text())
    assert job["kind"] == "Job"
    assert job["metadata"]["name"] == "opsloop-retrain-run-3"
    assert set(job["metadata"]) == {"name", "labels"}  # nothing the server owns
    assert "status" not in job
    [created] = job["spec"]["template"]["spec"]["containers"]
    assert created["image"] == "ghcr.io/opsloop/opsloop-train:0.1.0"
    assert created["args"] == ["loop", "retrain", "--run", "3"]
    # Without the CronJob in the cluster, or without kubectl, the run fails saying why.
    missing = tmp_path / "missing"
    missing.write_text("#!/bin/sh\necho 'cronjobs \"opsloop-retrain\" not found' >&2\nexit 1\n")
    missing.chmod(0o755)
    with pytest.raises(ConfigError, match="not found; apply deploy/k8s's overlay"):
        job_manifest(Path("cronjob/opsloop-retrain"), 4, str(missing))
    with pytest.raises(ConfigError, match=r"cannot run .*OPSLOOP_LOOP_KUBECTL"):
        job_manifest(Path("cronjob/opsloop-retrain"), 4, str(tmp_path / "no-kubectl"))


def test_a_template_that_is_not_a_job_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "deployment.yaml"
    other.write_text("kind: Deployment\nmetadata: {name: x}\n")
    with pytest.raises(ConfigError, match="is not a Kubernetes Job or CronJob"):
        job_manifest(other, 1)


@pytest.fixture
def api() -> Iterator[tuple[str, list[dict[str, object]]]]:
    received: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            received.append(
                {"auth": self.headers["authorization"], "body": json.loads(self.rfile.read(length))}
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/repos/o/r/dispatches", received
    finally:
        server.shutdown()
        server.server_close()


def test_a_dispatch_posts_the_retrain_event(api: tuple[str, list[dict[str, object]]]) -> None:
    url, received = api
    settings = load_loop_settings(runner="dispatch", dispatch_url=url, dispatch_token="gh-token")
    DispatchRunner(settings).start(5)
    assert received == [
        {
            "auth": "Bearer gh-token",
            "body": {"event_type": "opsloop-retrain", "client_payload": {"run": 5}},
        }
    ]
    with pytest.raises(ConfigError, match="OPSLOOP_LOOP_DISPATCH_URL"):
        DispatchRunner(load_loop_settings(runner="dispatch"))
