"""Where a loop run's work happens: this machine, a Kubernetes Job, or a CI workflow dispatch.

The work is always the same command, `opsloop loop retrain --run N`, which reads and writes the
run's row in the loop database; the runner only decides where it starts. `process` (the default)
starts it beside the controller; `kubernetes` creates a Job from `OPSLOOP_LOOP_JOB_TEMPLATE` with
kubectl (the retrain job of deploy/k8s: a file, or `cronjob/NAME` to read the CronJob the cluster
holds, as the overlay rendered it), and `dispatch` posts a `repository_dispatch` event
(`opsloop-retrain`) that `.github/workflows/ct.yaml` answers. The last two need a shared loop
database (PostgreSQL) for the remote run to report back.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import httpx

from opsloop.errors import ConfigError, OpsloopError, first_line
from opsloop.loop.settings import LoopSettings

logger = logging.getLogger(__name__)

OPSLOOP = [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())"]
DISPATCH_EVENT = "opsloop-retrain"
# A job template named like this (and not a file) is read from the cluster with kubectl.
CLUSTER_TEMPLATE_PREFIX = "cronjob/"


def retrain_args(run_id: int) -> list[str]:
    """The CLI arguments of a run's work."""
    return ["loop", "retrain", "--run", str(run_id)]


class Runner(Protocol):
    """Starts run `run_id`'s work; `wait` blocks until it ended (remote runners return at once)."""

    name: str

    def start(self, run_id: int) -> None: ...

    def running(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> None: ...


class ProcessRunner:
    """`opsloop loop retrain --run N` as a child process of the controller, on this machine."""

    name = "process"

    def __init__(self, settings: LoopSettings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, run_id: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"run-{run_id}.log"
        with log_path.open("ab") as log:
            # Its own session: a Ctrl-C or SIGTERM for the controller does not kill a half-done
            # run (the run records its own end); it finishes under the loop's lock.
            self.process = subprocess.Popen(
                [*OPSLOOP, *retrain_args(run_id)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                start_new_session=True,
            )
        logger.info("loop run %d started as pid %d (log %s)", run_id, self.process.pid, log_path)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> None:
        if self.process is not None:
            self.process.wait(timeout)


class KubernetesRunner:
    """A Kubernetes Job running the work in the train image, created with kubectl."""

    name = "kubernetes"

    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings

    def start(self, run_id: int) -> None:
        manifest = job_manifest(self.settings.job_template, run_id, self.settings.kubectl)
        import yaml

        done = subprocess.run(
            [self.settings.kubectl, "create", "-f", "-"],
            input=yaml.safe_dump(manifest),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise OpsloopError(
                f"kubectl create of the retrain Job for run {run_id} failed: "
                f"{first_line(RuntimeError(done.stderr or done.stdout))}"
            )
        logger.info("loop run %d: created Job %s", run_id, manifest["metadata"]["name"])

    def running(self) -> bool:
        return False  # the Job reports through the loop database

    def wait(self, timeout: float | None = None) -> None:
        pass


def read_job_template(template: Path, kubectl: str = "kubectl") -> Any:
    """The template's document: the file `template`, or, for `cronjob/NAME` where no such file
    exists, that CronJob as the cluster holds it (`kubectl get`: the image, namespace and
    settings the overlay applied)."""
    import yaml

    name = template.as_posix()
    if name.startswith(CLUSTER_TEMPLATE_PREFIX) and not template.exists():
        try:
            done = subprocess.run(
                [kubectl, "get", name, "--output", "json"],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(
                f"cannot run {kubectl} to read {name}: {first_line(exc)} (OPSLOOP_LOOP_KUBECTL)"
            ) from exc
        if done.returncode != 0:
            raise ConfigError(
                f"cannot read the retrain Job template {name} from the cluster: "
                f"{first_line(RuntimeError(done.stderr or done.stdout))}; apply deploy/k8s's "
                "overlay (it holds the CronJob) or set OPSLOOP_LOOP_JOB_TEMPLATE to a file"
            )
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"kubectl get {name} printed no JSON: {first_line(exc)}") from exc
    try:
        return yaml.safe_load(template.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"cannot read the retrain Job template {template}: {first_line(exc)}; set "
            "OPSLOOP_LOOP_JOB_TEMPLATE to deploy/k8s's retrain job"
        ) from exc


def job_manifest(template: Path, run_id: int, kubectl: str = "kubectl") -> dict[str, Any]:
    """The retrain Job of `template` (a Job, or the suspended CronJob whose job template it
    uses; see `read_job_template`), named for the run, its container running the work."""
    document = read_job_template(template, kubectl)
    if not isinstance(document, dict) or document.get("kind") not in ("Job", "CronJob"):
        raise ConfigError(f"{template} is not a Kubernetes Job or CronJob manifest")
    if document["kind"] == "CronJob":
        document = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": document["metadata"]["name"],
                "labels": dict(document["metadata"].get("labels", {})),
            },
            "spec": document["spec"]["jobTemplate"]["spec"],
        }
    job = copy.deepcopy(document)
    job["metadata"]["name"] = f"{job['metadata'].get('name', 'opsloop-retrain')}-run-{run_id}"
    job["metadata"].setdefault("labels", {})["opsloop.io/loop-run"] = str(run_id)
    [container, *_] = job["spec"]["template"]["spec"]["containers"]
    container["args"] = retrain_args(run_id)
    return dict(job)


class DispatchRunner:
    """A `repository_dispatch` event that starts the CT workflow on the CI provider."""

    name = "dispatch"

    def __init__(self, settings: LoopSettings) -> None:
        if not settings.dispatch_url or settings.dispatch_token is None:
            raise ConfigError(
                "the dispatch runner needs OPSLOOP_LOOP_DISPATCH_URL "
                "(https://api.github.com/repos/OWNER/REPO/dispatches) and "
                "OPSLOOP_LOOP_DISPATCH_TOKEN"
            )
        self.url = settings.dispatch_url
        self.token = settings.dispatch_token.get_secret_value()

    def start(self, run_id: int) -> None:
        response = httpx.post(
            self.url,
            json={"event_type": DISPATCH_EVENT, "client_payload": {"run": run_id}},
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/vnd.github+json",
            },
            timeout=30,
        )
        if response.status_code >= 300:
            raise OpsloopError(
                f"the workflow dispatch for run {run_id} was refused: {response.status_code} "
                f"{response.text[:200]}"
            )
        logger.info("loop run %d: dispatched %s", run_id, DISPATCH_EVENT)

    def running(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> None:
        pass


def make_runner(settings: LoopSettings) -> Runner:
    if settings.runner == "kubernetes":
        return KubernetesRunner(settings)
    if settings.runner == "dispatch":
        return DispatchRunner(settings)
    return ProcessRunner(settings, settings.workspace / ".opsloop" / "loop" / "logs")
