"""How opsloop is built and delivered, checked without building anything: the Dockerfiles' shape,
the compose file, and the GitHub workflows against `.ci/run` (same checks, same packages).

tests/integration/test_containers.py builds and runs the images and the compose stack for real.
"""

from __future__ import annotations

import re
import shlex
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from opsloop.loop.runner import (
    CLUSTER_TEMPLATE_PREFIX,
    DISPATCH_EVENT,
    DispatchRunner,
    retrain_args,
)
from opsloop.loop.settings import LoopSettings
from opsloop.predictions import PREDLOG_URL_ENV
from opsloop.tracking import TRACKING_URI_ENV
from tests.deploy.support import DEPLOY, KUBERNETES_VERSION, ROOT, unknown_variables

SERVICE_IMAGES = ("serve", "monitor", "train", "loop", "ui")
WORKFLOWS = ROOT / ".github" / "workflows"
VARIABLE = re.compile(r"^\$\{(\w+):-([^}]+)\}$")


def dockerfile(name: str) -> str:
    return (ROOT / "dockerfiles" / f"{name}.dockerfile").read_text()


def workflow(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True)
    return data  # type: ignore[no-any-return]


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("uses", "")) for step in job["steps"])


@pytest.mark.parametrize("name", SERVICE_IMAGES)
def test_service_images_share_one_shape(name: str) -> None:
    text = dockerfile(name)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    # The base image is a build argument, used by both stages (the loop's also copies kubectl
    # from an image that is an argument too).
    assert lines[0] == "ARG BASE=python:3.11-slim"
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    extra = ["${KUBECTL_IMAGE}"] if name == "loop" else []
    assert stages == ["${BASE}", "build", *extra, "${BASE}"]
    assert "USER 10001:10001" in text
    assert "uv export --frozen" in text  # exact versions from uv.lock
    assert "uv pip check" in text
    assert re.search(r"org\.opencontainers\.image\.revision=\"\$\{GIT_COMMIT\}\"", text)
    # The commit label comes last, so a new commit rebuilds no dependency layer.
    assert text.index("ARG GIT_COMMIT") > text.rindex("RUN ")
    assert "HEALTHCHECK" in text
    # Every image starts with the same build stage, so they share its cached layers; the
    # project's own wheel comes last, so a change to src/ rebuilds no dependency layer.
    serve = dockerfile("serve")
    common = serve[serve.index("FROM ${BASE} AS build") : serve.index("/tmp/base.txt\n") + 14]
    assert common in text
    assert text.index("FROM build AS wheel") > text.rindex("uv pip install --compile-bytecode")
    assert "COPY --from=wheel /dist /tmp/dist" in text


def test_serving_images_carry_no_training_dependencies() -> None:
    # The PostgreSQL driver everywhere (a prediction log or tracking store at scale).
    assert re.findall(r"--extra (\w+)", dockerfile("serve")) == ["postgres"]
    assert re.findall(r"--extra (\w+)", dockerfile("monitor")) == ["postgres", "monitor"]
    assert re.findall(r"--extra (\w+)", dockerfile("train")) == ["postgres", "train"]
    # The loop controller computes its evidence with the monitor's code; the app has its own.
    assert re.findall(r"--extra (\w+)", dockerfile("loop")) == ["postgres", "monitor"]
    assert re.findall(r"--extra (\w+)", dockerfile("ui")) == ["postgres", "ui"]
    assert "/v2/health/ready" in dockerfile("serve")
    assert 'ENTRYPOINT ["opsloop", "monitor", "serve"]' in dockerfile("monitor")
    assert 'ENTRYPOINT ["opsloop", "loop", "serve"]' in dockerfile("loop")
    assert 'ENTRYPOINT ["opsloop", "ui"]' in dockerfile("ui")
    assert "/_stcore/health" in dockerfile("ui")
    assert "HOME=/tmp" in dockerfile("ui")  # Streamlit's home on a read-only root filesystem
    # The train image takes a CPU build of torch, never the CUDA one PyPI serves on Linux.
    assert "download.pytorch.org/whl/cpu" in dockerfile("train")
    assert re.search(r"grep -vE '\^\(torch==\|triton==\|nvidia-\|cuda-\)'", dockerfile("train"))


def test_the_loop_image_shares_the_monitors_layers_and_carries_kubectl() -> None:
    loop, monitor = dockerfile("loop"), dockerfile("monitor")
    # Its build stage is the monitor's, instruction for instruction: built once, shared.
    build = monitor[monitor.index("FROM ${BASE} AS build") : monitor.index("RUN uv pip check")]
    assert build in loop
    # So is its final stage up to the project's wheel: the ~1 GB environment is one layer on
    # disk for both images; kubectl and the configs come after.
    end = "    && rm -rf /tmp/dist\n"
    final = monitor[monitor.rindex("FROM ${BASE}\n") : monitor.index(end) + len(end)]
    assert final in loop
    assert loop.index(final) < loop.index("COPY --from=kubectl")
    # kubectl for the `kubernetes` runner, from the official image, within one minor version of
    # the oldest Kubernetes the manifests promise (tests/deploy/support.py).
    kubectl = re.search(r"^ARG KUBECTL_IMAGE=registry\.k8s\.io/kubectl:v1\.(\d+)\.\d+$", loop, re.M)
    assert kubectl, "the loop image takes kubectl from registry.k8s.io"
    assert abs(int(kubectl.group(1)) - int(KUBERNETES_VERSION.split(".")[1])) <= 1
    assert "COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl" in loop
    # The runner and template it uses in a cluster (deploy/k8s/components/loop sets them too).
    assert "OPSLOOP_LOOP_RUNNER=kubernetes" in loop
    assert f"OPSLOOP_LOOP_JOB_TEMPLATE={CLUSTER_TEMPLATE_PREFIX}opsloop-retrain" in loop
    assert "HOME=/tmp" in loop  # kubectl's cache on a read-only root filesystem
    script = (DEPLOY / "images" / "build.sh").read_text()
    assert "KUBECTL_IMAGE" in script  # a local kubectl image where no registry answers


def test_make_images_builds_every_dockerfile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(wildcard dockerfiles/*.dockerfile)" in makefile
    assert re.search(r"^images:.*\n\tdeploy/images/build\.sh \$\(IMAGES\)", makefile, re.MULTILINE)
    script = (DEPLOY / "images" / "build.sh").read_text()
    assert "docker info" in script  # docker when its engine answers, else podman
    assert "debootstrap" in script
    # The commit label on the command line too: buildah's cache would keep an old one.
    assert '--label "org.opencontainers.image.revision=$commit"' in script
    for target in ("stack-up", "stack-down", "lint-deploy"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def test_compose_file_is_well_formed_and_mounts_existing_files() -> None:
    data = compose()
    services = data["services"]
    assert {"api", "monitor", "mlflow", "prometheus", "alertmanager", "grafana"} <= services.keys()
    declared_volumes = set(data.get("volumes") or {})
    for name, service in services.items():
        assert re.match(r"\$\{\w+:-", service["image"]), f"{name}: the image is not a variable"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
            assert service["build"]["args"]["BASE"].startswith("${BASE:-")
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            assert re.match(r"127\.0\.0\.1:\$\{\w+_PORT:-\d+\}:\d+$", port), f"{name}: {port}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume[: volume.index("}") + 1] if volume.startswith("${") else volume
            default = VARIABLE.match(source)
            source = default.group(2) if default else source.split(":")[0]
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                assert path.exists() or path.is_relative_to(ROOT / "bundles"), f"{name}: {source}"
            else:
                assert source in declared_volumes, f"{name}: undeclared volume {source}"
    assert {"loop", "ui"} <= services.keys()
    prometheus_mounts = " ".join(services["prometheus"]["volumes"])
    assert "./prometheus/prometheus.yml" in prometheus_mounts
    assert "./prometheus/alerts.yml" in prometheus_mounts
    # Prometheus scrapes the services by their compose names.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {"api:8000", "monitor:8001", "loop:8002"} <= targets


def test_compose_builds_the_images_make_images_names() -> None:
    services = compose()["services"]
    for service, image in (("api", "serve"), ("monitor", "monitor"), ("ui", "ui")):
        assert services[service]["image"] == (
            f"${{OPSLOOP_IMAGE_PREFIX:-localhost/opsloop-}}{image}:${{OPSLOOP_IMAGE_TAG:-latest}}"
        )
        assert services[service]["build"]["dockerfile"] == f"dockerfiles/{image}.dockerfile"
    # mlflow's entrypoint is set, so the official image and the train image both run the server.
    assert services["mlflow"]["entrypoint"] == ["mlflow"]
    assert services["mlflow"]["command"][0] == "server"


def test_compose_runs_the_loop_and_the_app_on_the_shared_workspace() -> None:
    services = compose()["services"]
    loop, ui, api = services["loop"], services["ui"], services["api"]
    # The loop retrains in a child process, which needs torch: the train image, `loop serve`.
    assert loop["image"] == (
        "${OPSLOOP_IMAGE_PREFIX:-localhost/opsloop-}train:${OPSLOOP_IMAGE_TAG:-latest}"
    )
    assert loop["build"]["dockerfile"] == "dockerfiles/train.dockerfile"
    assert [*loop["entrypoint"], *loop["command"]] == ["opsloop", "loop", "serve"]
    env = loop["environment"]
    assert env["OPSLOOP_LOOP_RUNNER"] == "process"
    assert env["OPSLOOP_LOOP_HOST"] == "0.0.0.0"
    assert env["OPSLOOP_LOOP_MONITOR_URL"] == "http://monitor:8001"
    assert env["OPSLOOP_TRACKING_URI"] == "http://mlflow:5000"
    assert unknown_variables(list(env)) == set()
    assert "/health" in " ".join(loop["healthcheck"]["test"])  # the train image has none
    # The loop, the app and the API share the workspace volume: the prediction log the API
    # writes is the one the loop learns from and the app shows, beside the loop's database.
    shared = "opsloop-data:/var/lib/opsloop"
    assert shared in api["volumes"]
    assert shared in loop["volumes"]
    assert shared in ui["volumes"]
    log = "sqlite:////var/lib/opsloop/predictions.db"
    assert api["environment"]["OPSLOOP_PREDLOG_URL"] == log
    assert env["OPSLOOP_LOOP_PREDLOG_URL"] == log
    assert env["OPSLOOP_LOOP_WORKSPACE"] == "/var/lib/opsloop"
    app = ui["environment"]
    assert app["OPSLOOP_UI_PREDLOG_URL"] == log
    assert app["OPSLOOP_UI_LOOP_DB_URL"] == "sqlite:////var/lib/opsloop/loop.db"
    assert app["OPSLOOP_UI_SERVER_URL"] == "http://api:8000"
    assert app["OPSLOOP_UI_MONITOR_URL"] == "http://monitor:8001"
    assert app["OPSLOOP_UI_TRACKING_URI"] == "http://mlflow:5000"
    assert unknown_variables(list(app)) == set()
    # A read-only root filesystem; Streamlit's HOME on the writable /tmp.
    assert ui["read_only"] is True
    assert app["HOME"] == "/tmp"
    assert "/tmp" in ui["tmpfs"]


def test_alertmanager_reaches_the_loop_inside_the_stack() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    [receiver] = [r for r in config["receivers"] if r["name"] == "opsloop-loop"]
    [webhook] = receiver["webhook_configs"]
    url = urlsplit(webhook["url"])
    # The loop's service name and container port, and its /alerts route.
    assert url.hostname in services
    assert url.hostname == "loop"
    assert str(url.port) == services["loop"]["environment"]["OPSLOOP_LOOP_PORT"]
    assert url.path == "/alerts"
    assert '"/alerts"' in (ROOT / "src" / "opsloop" / "loop" / "app.py").read_text()
    # Alerts from another container need the loop's bearer token: the one compose gives it.
    authorization = webhook["http_config"]["authorization"]
    assert authorization["type"] == "Bearer"
    assert authorization["credentials"] == services["loop"]["environment"]["OPSLOOP_LOOP_TOKEN"]
    # The quality alerts are routed there, and Alertmanager's config is the one compose mounts.
    routed = " ".join(
        str(route.get("matchers")) for route in config["route"]["routes"]
        if route["receiver"] == "opsloop-loop"
    )  # fmt: skip
    for alert in ("OpsloopOnlineAccuracyDrop", "OpsloopEstimatedAccuracyDrop"):
        assert alert in routed
    assert any("./alertmanager/alertmanager.yml" in v for v in services["alertmanager"]["volumes"])


def ci_run_packages() -> set[str]:
    text = (ROOT / ".ci" / "run").read_text()
    packages: set[str] = set()
    for match in re.finditer(r"APT_PACKAGES\+?=\(([^)]*)\)", text):
        packages |= set(match.group(1).split())
    return packages


def test_ci_runs_exactly_what_ci_run_runs() -> None:
    ci = workflow("ci.yaml")
    full = ci["jobs"]["full"]
    runs = [shlex.split(step["run"]) for step in full["steps"] if "run" in step]
    assert ["bash", ".ci/run"] in runs
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    # .ci/run installs what the container and Prometheus tests need; nothing skips silently.
    assert {"prometheus", "podman", "buildah", "runc", "debootstrap", "podman-compose"} <= (
        ci_run_packages()
    )
    # The full suite on pull requests and main; the fast job on every push.
    assert "pull_request" in ci["on"]
    assert "push" in ci["on"]
    assert full["if"] == "github.event_name != 'push' || github.ref == 'refs/heads/main'"
    assert "if" not in ci["jobs"]["fast"]
    assert "make test-fast" in steps_text(ci["jobs"]["fast"])
    for job in ci["jobs"].values():
        uv = next(s for s in job["steps"] if s.get("uses", "").startswith("astral-sh/setup-uv"))
        assert uv["with"]["cache-dependency-glob"] == "uv.lock"
    assert "coverage.xml" in steps_text(full) + str(full["steps"])


def test_cd_builds_smoke_tests_and_pushes_tagged_images() -> None:
    cd = workflow("cd.yaml")
    assert cd["on"]["push"]["tags"] == ["v*"]
    job = cd["jobs"]["images"]
    assert job["permissions"]["packages"] == "write"
    text = steps_text(job)
    assert "deploy/images/build.sh serve monitor train loop ui" in text
    assert "for name in serve monitor train loop ui; do" in text  # every image is pushed
    assert "pipeline experiment=tiny" in text
    assert "/v2/models/digits-cnn/infer" in text
    assert "ghcr.io/" in text
    assert "${PREFIX}${name}:${TAG}" in text  # the commit
    assert "${PREFIX}${name}:${VERSION}" in text  # the version
    assert job["env"]["TAG"] == "${{ github.sha }}"


def test_ct_retrains_on_data_changes_and_on_the_loops_dispatch() -> None:
    ct = workflow("ct.yaml")
    assert set(ct["on"]["pull_request"]["paths"]) == {"**.dvc", "dvc.lock"}
    assert "retrain" in ct["on"]["repository_dispatch"]["types"]
    assert "'retrain'" in ct["jobs"]["retrain"]["if"]  # not on the loop's event
    text = steps_text(ct["jobs"]["retrain"])
    for command in (
        "dvc pull",
        "dvc repro",
        "dvc metrics diff origin/main",
        "dvc plots diff origin/main",
    ):
        assert command in text, command
    assert "gh pr comment" in text
    assert "gh pr create" in text
    # dvc.yaml really declares the metrics and plots the report diffs.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert any("metrics" in stage for stage in stages.values())
    assert any("plots" in stage for stage in stages.values())


def test_ct_does_the_loops_dispatched_run() -> None:
    ct = workflow("ct.yaml")
    # The event the loop's dispatch runner posts is the one the workflow answers.
    assert DISPATCH_EVENT in ct["on"]["repository_dispatch"]["types"]
    job = ct["jobs"]["loop-run"]
    assert job["if"] == (
        f"github.event_name == 'repository_dispatch' && github.event.action == '{DISPATCH_EVENT}'"
    )
    # The runner's payload, {"run": N}, reaches `opsloop loop retrain --run N` (through the
    # environment, never pasted into the script).
    assert DispatchRunner.__module__ == "opsloop.loop.runner"
    assert job["env"]["RUN"] == "${{ github.event.client_payload.run }}"
    lines = [step["run"].strip() for step in job["steps"] if "run" in step]
    runs = [shlex.split(line) for line in lines if "\n" not in line]
    command = ["uv", "run", "--no-sync", "opsloop", "loop", "retrain", "--run", "$RUN"]
    assert command in runs
    assert ["opsloop", *retrain_args(7)[:-1]] == command[3:-1]  # what the other runners start
    # The stores come from secrets named like the variables opsloop reads.
    stores = {"OPSLOOP_LOOP_DB_URL", PREDLOG_URL_ENV, TRACKING_URI_ENV}
    for name in stores:
        assert job["env"][name] == f"${{{{ secrets.{name} }}}}"
    assert "OPSLOOP_LOOP_DB_URL" in {f"OPSLOOP_LOOP_{n.upper()}" for n in LoopSettings.model_fields}
    assert unknown_variables(list(job["env"])) == set()
    # The base dataset the data version extends is there before the run.
    assert "opsloop data" in steps_text(job)


def test_docs_workflow_publishes_the_strict_build() -> None:
    docs = workflow("docs.yaml")
    assert "mkdocs build --strict" in steps_text(docs["jobs"]["build"])
    assert "actions/deploy-pages" in steps_text(docs["jobs"]["deploy"])
    assert docs["jobs"]["deploy"]["permissions"]["pages"] == "write"


def test_every_workflow_pins_actions_and_limits_permissions() -> None:
    for path in sorted(WORKFLOWS.glob("*.yaml")):
        data = workflow(path.name)
        assert data["permissions"] == {"contents": "read"}, path.name
        for job in data["jobs"].values():
            assert "timeout-minutes" in job, path.name
            for step in job.get("steps", []):
                if "uses" in step:
                    assert re.search(r"@v\d+$", step["uses"]), step["uses"]
