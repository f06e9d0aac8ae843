"""opsloop's container images built and run with podman, and the compose stack brought up.

`deploy/images/build.sh` (what `make images` runs) builds every image once per module: serve,
monitor, train, loop and ui from dockerfiles/, and Prometheus and Alertmanager from Debian's
packages (deploy/images/) for the stack, on python:3.11-slim where a registry answers, else on a
Debian base bootstrapped here (built once, then reused). Then each image runs for real: the API
answers an inference, the monitor reports on the predictions the API logged, the train image runs
`opsloop pipeline experiment=tiny` in a mounted workspace without a network, the loop controller
records a decision its service then lists, the app serves its pages on a read-only root
filesystem, and deploy/compose.yaml comes up with podman-compose, serves an inference through the
stack, is scraped by its Prometheus, routes an alert through its Alertmanager to the loop, and
shows the served model in the app (in chromium, where it is installed). Every container, volume
and network a test creates is removed; the images stay as the build cache. Skipped only where
podman (or podman-compose) is not installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.integration.processes import free_port, metric_value

if TYPE_CHECKING:
    from opsloop.export import ExportResult

ROOT = Path(__file__).resolve().parents[2]
PODMAN = shutil.which("podman")
PODMAN_COMPOSE = shutil.which("podman-compose")
PREFIX = "localhost/opsloop-test-"
TAG = "test"
IMAGES = ("serve", "monitor", "train", "loop", "ui", "prometheus", "alertmanager")
BUILD_TIMEOUT_S = 1800
START_TIMEOUT_S = 180
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(PODMAN is None, reason="podman is not installed (apt-get install podman)"),
    # The first test also builds every image (about 5 minutes from an empty image store here).
    pytest.mark.timeout(BUILD_TIMEOUT_S + 600),
]

# Rootful podman in a sandbox may not set resource limits; no default ulimits then.
CONTAINERS_CONF = ROOT / "deploy" / "images" / "containers.conf"


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, timeout: float = 300, check: bool = True) -> str:
    assert PODMAN is not None
    done = subprocess.run(
        [PODMAN, *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def image(name: str) -> str:
    return f"{PREFIX}{name}:{TAG}"


def inspect_image(name: str) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", image(name)))[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every image built once, exactly as `make images` builds them; the commit they carry."""
    log = tmp_path_factory.mktemp("images") / "build.log"
    env = podman_env() | {"ENGINE": "podman", "PREFIX": PREFIX, "TAG": TAG}
    with log.open("w") as out:
        done = subprocess.run(
            [str(ROOT / "deploy" / "images" / "build.sh"), *IMAGES],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
        )  # fmt: skip
    assert done.returncode == 0, log.read_text()[-5000:]
    commit = re.search(r"^build: commit (\S+),", log.read_text(), re.MULTILINE)
    assert commit, log.read_text()[-2000:]
    return commit.group(1)


@contextlib.contextmanager
def container(name: str, *args: str, command: Sequence[str] = ()) -> Iterator[str]:
    """`podman run -d` of one image with a unique name; always removed when the block ends."""
    cname = f"opsloop-test-{name}-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", cname, *args, image(name), *command)
    try:
        yield cname
    finally:
        podman("rm", "--force", "--time", "5", cname, check=False)


def wait_for(what: str, ready: Callable[[], bool], logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if ready():
                return
        time.sleep(1)
    raise AssertionError(f"{what} not reached after {START_TIMEOUT_S}s:\n{logs()}")


def window_size(monitor_url: str) -> float:
    """The number of logged examples in the monitor's latest verdict."""
    metrics = httpx.get(f"{monitor_url}/metrics", timeout=5).text
    return metric_value(metrics, "opsloop_drift_window_size")


def wait_for_http(url: str, cname: str) -> None:
    wait_for(
        url,
        lambda: httpx.get(url, timeout=2).status_code == 200,
        lambda: podman("logs", cname, check=False)[-3000:],
    )


def readable_copy(source: Path, target: Path) -> Path:
    """`source` copied where the images' non-root user (10001) can read it."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def writable_dir(path: Path) -> Path:
    """An empty directory the images' user (uid 10001) owns, for a bind mount it writes."""
    path.mkdir()
    os.chown(path, 10001, 10001)
    return path


def infer_body(batch: int, shape: Sequence[int]) -> dict[str, Any]:
    size = batch * math.prod(shape)
    return {
        "inputs": [
            {"name": "pixels", "shape": [batch, *shape], "datatype": "FP32", "data": [8.0] * size}
        ]
    }


def rendered_page(url: str, title: str) -> str | None:
    """The text of a Streamlit page once its script ran, in headless chromium; None where
    chromium or chromedriver is not installed (the browser test says the same)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.set_page_load_timeout(START_TIMEOUT_S)
        browser.get(url)
        idle = '[data-testid="stApp"][data-test-script-state="notRunning"]'

        def ready() -> bool:
            headings = [h.text for h in browser.find_elements("css selector", "h1")]
            return title in headings and bool(browser.find_elements("css selector", idle))

        wait_for(f"the {title} page at {url}", ready, lambda: browser.page_source[-3000:])
        time.sleep(1.0)  # the last messages of the script's run
        main = browser.find_element("css selector", '[data-testid="stMain"]')
        return str(main.text)
    finally:
        browser.quit()


def has_module(name: str, module: str) -> bool:
    """Whether `module` imports inside the image `name` (run without a network)."""
    done = subprocess.run(
        [str(PODMAN), "run", "--rm", "--network", "none", "--entrypoint", "python3", image(name),
         "-c", f"import {module}"],
        env=podman_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode == 0


@pytest.fixture(scope="module")
def trained_workspace(images: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`opsloop pipeline experiment=tiny` run by the train image in a mounted, empty workspace."""
    workspace = writable_dir(tmp_path_factory.mktemp("train") / "workspace")
    done = subprocess.run(
        [str(PODMAN), "run", "--rm", "--network", "none", "-e", "OMP_NUM_THREADS=1",
         "-v", f"{workspace}:/workspace", image("train"), "pipeline", "experiment=tiny"],
        env=podman_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "promoted" in done.stdout
    return workspace


def test_images_are_labelled_non_root_and_lean(images: str) -> None:
    # The commit build.sh stamped (HEAD may move while a long build runs in a shared checkout).
    commit = images
    inside_git = (ROOT / ".git").exists()
    assert len(commit) == 40 if inside_git else commit == "unknown"
    for name in ("serve", "monitor", "train", "loop", "ui"):
        config = inspect_image(name)["Config"]
        assert config["User"] == "10001:10001", name
        assert config["Labels"]["org.opencontainers.image.revision"] == commit, name
        assert config["Labels"]["org.opencontainers.image.title"] == f"opsloop-{name}"
    for name in ("serve", "monitor", "loop", "ui"):
        assert inspect_image(name)["Healthcheck"]["Test"][0] == "CMD", name
    for name in ("prometheus", "alertmanager"):
        assert inspect_image(name)["Config"]["User"] == "65534:65534", name
    # The serving path never loads torch: neither the API, the monitor, the loop controller nor
    # the app carries it (the loop's retrains run in the train image).
    for name in ("serve", "monitor", "loop", "ui"):
        assert not has_module(name, "torch"), name
    assert has_module("ui", "streamlit")
    assert has_module("monitor", "evidently")
    assert has_module("serve", "psycopg")  # a PostgreSQL prediction log works out of the box
    assert has_module("train", "torch")
    assert inspect_image("serve")["Size"] < inspect_image("monitor")["Size"]


def test_serve_image_answers_an_inference(
    images: str, bundle: ExportResult, tmp_path: Path
) -> None:
    model = readable_copy(bundle.path, tmp_path / "bundle")
    port = free_port()
    mounts = ["-v", f"{model}:/bundle:ro", "-p", f"127.0.0.1:{port}:8000"]
    with container("serve", *mounts, "-e", "OPSLOOP_WORKERS=1") as cname:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/v2/health/ready", cname)
        name = bundle.manifest.model_name
        response = httpx.post(
            f"{url}/v2/models/{name}/infer", json=infer_body(3, (1, 8, 8)), timeout=10
        )
        assert response.status_code == 200, response.text
        outputs = {output["name"]: output for output in response.json()["outputs"]}
        assert outputs["probabilities"]["shape"] == [3, 10]
        assert sum(outputs["probabilities"]["data"][:10]) == pytest.approx(1.0, abs=1e-4)
        bad = httpx.post(f"{url}/v2/models/{name}/infer", json={"inputs": []}, timeout=10)
        assert bad.status_code == 400
        # The image's own HEALTHCHECK, run by podman, passes; the server runs as uid 10001.
        podman("healthcheck", "run", cname)
        assert podman("exec", cname, "id", "-u").strip() == "10001"


def test_monitor_image_reports_on_the_logged_predictions(
    images: str, bundle: ExportResult, tmp_path: Path
) -> None:
    model = readable_copy(bundle.path, tmp_path / "bundle")
    data = writable_dir(tmp_path / "data")
    api_port, monitor_port = free_port(), free_port()
    log = "sqlite:////data/predictions.db"
    shared = ["-v", f"{model}:/bundle:ro", "-v", f"{data}:/data"]
    api_args = [*shared, "-p", f"127.0.0.1:{api_port}:8000", "-e", f"OPSLOOP_PREDLOG_URL={log}",
                "-e", "OPSLOOP_WORKERS=1", "-e", "OPSLOOP_PREDLOG_FLUSH_MS=50"]  # fmt: skip
    monitor_args = [*shared, "-p", f"127.0.0.1:{monitor_port}:8001",
                    "-e", f"OPSLOOP_MONITOR_PREDLOG_URL={log}",
                    "-e", "OPSLOOP_MONITOR_INTERVAL_SECONDS=1"]  # fmt: skip
    with container("serve", *api_args) as api, container("monitor", *monitor_args) as monitor:
        api_url, monitor_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{monitor_port}"
        wait_for_http(f"{api_url}/v2/health/ready", api)
        name = bundle.manifest.model_name
        for _ in range(5):
            response = httpx.post(
                f"{api_url}/v2/models/{name}/infer", json=infer_body(10, (1, 8, 8)), timeout=10
            )
            assert response.status_code == 200, response.text
        wait_for_http(f"{monitor_url}/health", monitor)
        wait_for(
            "a drift verdict",
            lambda: httpx.get(f"{monitor_url}/drift", timeout=5).status_code == 200,
            lambda: podman("logs", monitor, check=False)[-3000:],
        )
        report = httpx.get(f"{monitor_url}/drift", timeout=5).json()
        assert isinstance(report["drift"], bool)
        # The monitor checks every second, the ingester commits every 50 ms: a first verdict may
        # come from a window the last request had not reached yet. The next one has them all.
        wait_for(
            "a verdict on all 50 logged examples",
            lambda: window_size(monitor_url) == 50,
            lambda: podman("logs", monitor, check=False)[-3000:],
        )
        metrics = httpx.get(f"{monitor_url}/metrics", timeout=5).text
        assert metric_value(metrics, "opsloop_drift_window_size") == 50
        assert metric_value(metrics, "opsloop_drift_monitor_healthy") == 1
        podman("healthcheck", "run", monitor)


def test_loop_image_decides_records_and_lists_its_history(images: str, tmp_path: Path) -> None:
    data = writable_dir(tmp_path / "data")
    port = free_port()
    mounts = ["-v", f"{data}:/var/lib/opsloop", "-p", f"127.0.0.1:{port}:8002"]
    with container("loop", *mounts, "-e", "OPSLOOP_LOOP_INTERVAL_SECONDS=3600") as cname:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", cname)
        assert httpx.get(f"{url}/history", timeout=5).json() == []
        # One decision by hand, from the CLI in the same container: recorded in the loop's
        # database on the volume (SQLite), which the service lists.
        decided = podman(
            "exec", cname, "opsloop", "loop", "run", "--once", "--dry-run", "--reason", "a test"
        )
        assert "manual: a test" in decided, decided
        [run] = httpx.get(f"{url}/history", timeout=5).json()
        assert run["trigger"] == "manual"
        assert (data / "loop.db").stat().st_uid == 10001
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert "opsloop_loop_runs_total" in metrics
        # The `kubernetes` runner's kubectl is there (no cluster to talk to here).
        assert "Client Version: v1." in podman("exec", cname, "kubectl", "version", "--client")
        podman("healthcheck", "run", cname)
        assert podman("exec", cname, "id", "-u").strip() == "10001"


def test_ui_image_serves_the_app_on_a_read_only_root(
    images: str, bundle: ExportResult, tmp_path: Path
) -> None:
    model = readable_copy(bundle.path, tmp_path / "bundle")
    data = writable_dir(tmp_path / "data")
    port = free_port()
    args = ["--read-only", "--tmpfs", "/tmp", "-v", f"{model}:/bundle:ro",
            "-v", f"{data}:/var/lib/opsloop", "-p", f"127.0.0.1:{port}:8501"]  # fmt: skip
    with container("ui", *args) as cname:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/_stcore/health", cname)
        page = httpx.get(f"{url}/predict", timeout=10)
        assert page.status_code == 200
        assert 'id="root"' in page.text  # Streamlit's page, which the websocket then fills
        # Every page's module imports in the image (a missing dependency fails here, not in
        # front of a user); the app runs without torch.
        podman("exec", cname, "python3", "-c",
               "import opsloop.ui.predict, opsloop.ui.models, opsloop.ui.monitoring, "
               "opsloop.ui.loop, opsloop.monitor.report, mlflow")  # fmt: skip
        text = rendered_page(f"{url}/predict", "Predict")
        if text is not None:  # no server in this test: the page says so instead of failing
            assert "is not answering" in text, text
        podman("healthcheck", "run", cname)
        assert podman("exec", cname, "id", "-u").strip() == "10001"


def test_train_image_runs_the_pipeline_in_a_mounted_workspace(trained_workspace: Path) -> None:
    manifest = json.loads(
        (trained_workspace / "bundles" / "digits-cnn" / "bundle.json").read_text()
    )
    assert manifest["model_name"] == "digits-cnn"
    assert (trained_workspace / "bundles" / "digits-cnn" / "model.onnx").stat().st_size > 1000
    assert (trained_workspace / "mlflow.db").stat().st_uid == 10001
    # A CPU build of torch: no CUDA libraries in the image.
    done = subprocess.run(
        [str(PODMAN), "run", "--rm", "--network", "none", "--entrypoint", "python3",
         image("train"), "-c", "import torch; print(torch.version.cuda)"],
        env=podman_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "None", done.stderr


@pytest.mark.skipif(PODMAN_COMPOSE is None, reason="podman-compose is not installed")
def test_compose_stack_serves_and_is_scraped(trained_workspace: Path, tmp_path: Path) -> None:
    project = f"opsloop-test-{uuid.uuid4().hex[:8]}"
    names = ("API", "MONITOR", "LOOP", "UI", "MLFLOW", "PROMETHEUS", "ALERTMANAGER")
    ports = {name: free_port() for name in names}
    bundle = readable_copy(trained_workspace / "bundles" / "digits-cnn", tmp_path / "bundle")
    env = podman_env() | {
        "OPSLOOP_IMAGE_PREFIX": PREFIX,
        "OPSLOOP_IMAGE_TAG": TAG,
        "OPSLOOP_BUNDLE_DIR": str(bundle),
        "OPSLOOP_MONITOR_INTERVAL_SECONDS": "2",
        # No registry here: the stack's third-party images built from Debian's packages, and
        # MLflow from the train image (which carries mlflow and its server).
        "MLFLOW_IMAGE": image("train"),
        "PROMETHEUS_IMAGE": image("prometheus"),
        "ALERTMANAGER_IMAGE": image("alertmanager"),
        "OPSLOOP_API_PORT": str(ports["API"]),
        "OPSLOOP_MONITOR_PORT": str(ports["MONITOR"]),
        "OPSLOOP_LOOP_PORT": str(ports["LOOP"]),
        "OPSLOOP_UI_PORT": str(ports["UI"]),
        "MLFLOW_PORT": str(ports["MLFLOW"]),
        "PROMETHEUS_PORT": str(ports["PROMETHEUS"]),
        "ALERTMANAGER_PORT": str(ports["ALERTMANAGER"]),
    }
    compose = [str(PODMAN_COMPOSE), "-f", str(ROOT / "deploy" / "compose.yaml"), "-p", project]
    # Grafana: no image here.
    services = ["api", "monitor", "loop", "ui", "mlflow", "prometheus", "alertmanager"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], env=env, capture_output=True, text=True, timeout=600, check=False
        )

    def logs() -> str:
        return podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                      "--format", "{{.Names}} {{.Status}}", check=False)  # fmt: skip

    try:
        up = run("up", "-d", "--no-build", *services)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        api = f"http://127.0.0.1:{ports['API']}"
        prometheus = f"http://127.0.0.1:{ports['PROMETHEUS']}"
        monitor = f"http://127.0.0.1:{ports['MONITOR']}"
        wait_for(
            f"{api}/v2/health/ready", lambda: httpx.get(f"{api}/v2/health/ready").is_success, logs
        )
        for _ in range(4):
            response = httpx.post(
                f"{api}/v2/models/digits-cnn/infer", json=infer_body(10, (1, 8, 8)), timeout=10
            )
            assert response.status_code == 200, response.text
        mlflow = f"http://127.0.0.1:{ports['MLFLOW']}/health"
        alertmanager = f"http://127.0.0.1:{ports['ALERTMANAGER']}/-/healthy"
        for url in (mlflow, alertmanager, f"{prometheus}/-/ready"):
            wait_for(url, lambda url=url: httpx.get(url, timeout=2).is_success, logs)

        def targets_up() -> bool:
            body = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()
            health = {t["labels"]["job"]: t["health"] for t in body["data"]["activeTargets"]}
            jobs = ("opsloop-api", "opsloop-monitor", "opsloop-loop")
            return all(health.get(job) == "up" for job in jobs)

        wait_for("Prometheus scraping the API, the monitor and the loop", targets_up, logs)
        # The API and the monitor share the prediction log on the stack's volume.
        wait_for("the monitor's verdict", lambda: httpx.get(f"{monitor}/drift").is_success, logs)

        def requests_scraped() -> bool:
            query = 'sum(opsloop_requests_total{job="opsloop-api",endpoint=~".*infer"})'
            body = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5)
            result = body.json()["data"]["result"]
            return bool(result) and float(result[0]["value"][1]) >= 4

        wait_for("the inferences in Prometheus", requests_scraped, logs)
        managers = httpx.get(f"{prometheus}/api/v1/alertmanagers", timeout=5).json()
        assert managers["data"]["activeAlertmanagers"]
        check_loop_and_app(project, ports, logs)
    finally:
        down = run("down", "-v")
        podman("network", "rm", "--force", f"{project}_default", check=False)
    assert down.returncode == 0, down.stderr[-3000:]
    assert logs().strip() == ""
    volumes = podman("volume", "ls", "--filter", f"label=io.podman.compose.project={project}", "-q")
    assert volumes.strip() == ""


def check_loop_and_app(project: str, ports: dict[str, int], logs: Callable[[], str]) -> None:
    """In the running stack: the loop and the app are healthy, Alertmanager's webhook reaches
    the loop (by its service name, with its token), and the app shows the model the API serves."""
    loop = f"http://127.0.0.1:{ports['LOOP']}"
    app = f"http://127.0.0.1:{ports['UI']}"
    wait_for(f"{loop}/health", lambda: httpx.get(f"{loop}/health", timeout=2).is_success, logs)
    wait_for(f"{app}/_stcore/health", lambda: httpx.get(f"{app}/_stcore/health").is_success, logs)
    for service in ("loop", "ui"):  # their health checks (the loop's from compose) pass
        podman("healthcheck", "run", f"{project}_{service}_1")
    assert httpx.get(f"{loop}/history", timeout=5).json() == []
    # An accuracy alert posted to Alertmanager is routed to the loop, which records a decision
    # on it (skipped: the stack has no labelled production data to learn from yet).
    alert = {
        "labels": {"alertname": "OpsloopOnlineAccuracyDrop", "severity": "critical",
                   "job": "opsloop-monitor", "model_version": "1"},
        "annotations": {"summary": "the container test"},
    }  # fmt: skip
    alertmanager = f"http://127.0.0.1:{ports['ALERTMANAGER']}"
    posted = httpx.post(f"{alertmanager}/api/v2/alerts", json=[alert], timeout=5)
    assert posted.status_code == 200, posted.text

    def recorded() -> bool:
        return bool(httpx.get(f"{loop}/history", timeout=5).json())

    wait_for("the alert reaching the loop", recorded, lambda: logs() + podman(
        "logs", f"{project}_alertmanager_1", check=False)[-2000:])  # fmt: skip
    [decision] = httpx.get(f"{loop}/history", timeout=5).json()
    assert decision["trigger"] == "alert"
    assert decision["evidence"]["alerts"][0]["labels"]["alertname"] == alert["labels"]["alertname"]
    # The app talks to the API inside the stack (by its service name).
    text = rendered_page(f"{app}/predict", "Predict")
    if text is not None:
        assert re.search(r"Serving digits-cnn version \d+\.", text), text
