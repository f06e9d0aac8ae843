"""deploy/k8s/: the kustomize overlays render, and every object validates against Kubernetes'
own schemas (strict: an unknown or misspelt field fails) from the `kubernetes-validate` package.

No cluster runs here, so nothing is applied: rendering is done by `tests.deploy.kustomize` (and
compared with `kubectl kustomize` where kubectl exists), and the custom resources (KServe's
InferenceService, the Prometheus Operator's ServiceMonitor) are checked by validating the
Kubernetes types they embed (PodSpec, Container) and their wiring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsloop.config import load_config
from opsloop.loop.runner import CLUSTER_TEMPLATE_PREFIX
from tests.deploy.kustomize import KustomizeError, identity, render
from tests.deploy.support import (
    K8S,
    monitor_routes,
    serve_routes,
    unknown_variables,
    validate_object,
    validate_part,
)

OVERLAYS = ("overlays/local", "overlays/production", "kserve")
KUBECTL = shutil.which("kubectl")
CUSTOM = {"InferenceService", "ServiceMonitor"}
# KServe's fields beside the PodSpec in `spec.predictor` (its ComponentExtensionSpec).
KSERVE_EXTENSION = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}  # fmt: skip


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The overlay's objects by (kind, name)."""
    return {(r["kind"], r["metadata"]["name"]): r for r in render(K8S / overlay)}


def with_loop_component(tmp_path: Path) -> Path:
    """A kustomization of the base plus the loop component, as an overlay will include it."""
    here = tmp_path / "with-loop"
    here.mkdir()
    base = os.path.relpath(K8S / "base", here)
    loop = os.path.relpath(K8S / "components" / "loop", here)
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "opsloop",
                "resources": [base],
                "components": [loop],
            }
        )
    )
    return here


def pod_specs(resource: dict[str, Any]) -> list[dict[str, Any]]:
    kind, spec = resource["kind"], resource.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "InferenceService":
        return [{k: v for k, v in spec["predictor"].items() if k not in KSERVE_EXTENSION}]
    return []


def env_names(container: dict[str, Any]) -> list[str]:
    return [variable["name"] for variable in container.get("env", [])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(K8S / overlay)
    assert objects
    for resource in objects:
        assert resource["metadata"]["namespace" if resource["kind"] != "Namespace" else "name"] == (
            "opsloop"
        )
        if resource["kind"] in CUSTOM:
            for spec in pod_specs(resource):
                validate_part(spec, "podspec-v1")
        else:
            validate_object(resource)


def test_the_loop_component_renders_and_validates(tmp_path: Path) -> None:
    objects = {(r["kind"], r["metadata"]["name"]): r for r in render(with_loop_component(tmp_path))}
    for resource in objects.values():
        validate_object(resource)
    container = pod_specs(objects["Deployment", "opsloop-loop"])[0]["containers"][0]
    assert container["command"] == ["opsloop", "loop", "serve"]
    assert (
        objects["Deployment", "opsloop-loop"]["spec"]["template"]["spec"]["serviceAccountName"]
        == objects["ServiceAccount", "opsloop-loop"]["metadata"]["name"]
    )
    binding = objects["RoleBinding", "opsloop-loop"]
    assert binding["subjects"][0]["namespace"] == "opsloop"
    rules = objects["Role", "opsloop-loop"]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert any(r.get("resourceNames") == ["opsloop-retrain"] for r in rules)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
def test_python_rendering_matches_kubectl_kustomize(overlay: str) -> None:
    assert KUBECTL is not None
    output = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    theirs = sorted((doc for doc in yaml.safe_load_all(output) if doc), key=identity)
    assert sorted(render(K8S / overlay), key=identity) == theirs


def test_rendering_fails_loudly_outside_its_subset(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator: []\n")
    with pytest.raises(KustomizeError, match="configMapGenerator"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "base", tmp_path)],
                "patches": [
                    {"target": {"kind": "Deployment"}, "patch": "- {op: remove, path: /nope}"}
                ],
            }
        )
    )
    with pytest.raises(KustomizeError, match="/nope"):
        render(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_read_only_and_bounded(overlay: str) -> None:
    for resource in rendered(overlay).values():
        for spec in pod_specs(resource):
            assert spec["securityContext"]["runAsNonRoot"] is True, resource["metadata"]["name"]
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"]["drop"] == ["ALL"]
                assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
                assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
                # A read-only root needs a writable /tmp (Python, Prometheus' multiprocess dir).
                assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
                assert unknown_variables(env_names(container)) == set()
                # The overlay names a real image: registry and tag, never the base's bare name.
                assert "/" in container["image"]
                assert ":" in container["image"]


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/production"])
def test_serve_is_probed_drained_scaled_and_protected(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = objects["Deployment", "opsloop-serve"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    routes = serve_routes()
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    env = {v["name"]: v.get("value") for v in container["env"]}
    port = container["ports"][0]
    assert int(env["OPSLOOP_PORT"]) == port["containerPort"]
    assert env["OPSLOOP_HOST"] == "0.0.0.0"
    # Drain: the endpoints are removed during preStop, well inside the grace period.
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert 0 < sleep < pod["spec"]["terminationGracePeriodSeconds"] - 15
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = pod["metadata"]["labels"]
    service = objects["Service", "opsloop-serve"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    hpa = objects["HorizontalPodAutoscaler", "opsloop-serve"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (
        hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    )
    pdb = objects["PodDisruptionBudget", "opsloop-serve"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] or hpa["spec"]["minReplicas"] == 1
    )
    # The bundle comes from the models volume the retrain job writes.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert env["OPSLOOP_BUNDLE_PATH"].startswith("/models/")
    assert mounts["/models"]["readOnly"] is True


def test_the_monitor_is_probed_and_scraped() -> None:
    objects = rendered("overlays/local")
    pod = objects["Deployment", "opsloop-monitor"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in monitor_routes()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    assert annotations["prometheus.io/path"] in monitor_routes()
    # The local overlay shares the prediction log between the API and the monitor.
    secret = objects["Secret", "opsloop-secrets"]["stringData"]
    assert secret["predlog-url"].startswith("sqlite:////data/")
    for name in ("opsloop-serve", "opsloop-monitor"):
        spec = objects["Deployment", name]["spec"]["template"]["spec"]
        assert "/data" in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
        assert "opsloop-data" in claims
    assert ("PersistentVolumeClaim", "opsloop-data") in objects


def test_production_is_scraped_by_service_monitors() -> None:
    objects = rendered("overlays/production")
    for name in ("opsloop-serve", "opsloop-monitor"):
        monitor = objects["ServiceMonitor", name]
        service = objects["Service", name]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert "Secret" not in {kind for kind, _ in objects}  # from the secret manager, not git
    images = [
        c["image"] for r in objects.values() for spec in pod_specs(r) for c in spec["containers"]
    ]
    assert all(image.startswith("ghcr.io/") for image in images)


def test_the_retrain_job_template_runs_a_valid_pipeline() -> None:
    cronjob = rendered("overlays/production")["CronJob", "opsloop-retrain"]
    assert cronjob["spec"]["suspend"] is True
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_specs(cronjob)[0]
    container = spec["containers"][0]
    assert container["args"][0] == "pipeline"
    cfg = load_config(container["args"][1:])  # the overrides are valid config keys and values
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert cfg.workspace in mounts
    assert cfg.registry.bundle_dir in mounts
    assert spec["restartPolicy"] == "Never"


def test_kserve_runs_the_serving_image_as_a_v2_predictor() -> None:
    isvc = rendered("kserve")["InferenceService", "digits-cnn"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    container = predictor["containers"][0]
    validate_part(container, "container-v1")
    assert container["name"] == "kserve-container"  # what KServe's storage initializer targets
    assert container["image"].startswith("ghcr.io/")
    assert "opsloop-serve" in container["image"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["STORAGE_URI"].startswith(("gs://", "s3://", "pvc://"))
    assert env["OPSLOOP_BUNDLE_PATH"] == "/mnt/models"
    assert int(env["OPSLOOP_PORT"]) == container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] in serve_routes()
    assert unknown_variables(list(env)) == set()
    assert predictor["minReplicas"] <= predictor["maxReplicas"]


def test_the_config_map_sets_only_settings_the_services_read() -> None:
    data = rendered("overlays/production")["ConfigMap", "opsloop-config"]["data"]
    assert unknown_variables(list(data)) == set()
    assert data["OPSLOOP_WORKERS"] == "1"  # Kubernetes scales pods, not processes in a pod
    assert unknown_variables(["OPSLOOP_WORKER"]) == {"OPSLOOP_WORKER"}  # a typo is caught


def test_the_loop_component_wires_the_loop_service(tmp_path: Path) -> None:
    settings = pytest.importorskip("opsloop.loop.settings", reason="the loop service is not here")
    objects = {(r["kind"], r["metadata"]["name"]): r for r in render(with_loop_component(tmp_path))}
    pod = objects["Deployment", "opsloop-loop"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert unknown_variables(env_names(container)) == set()
    env = {v["name"]: v.get("value") for v in container["env"]}
    port = container["ports"][0]["containerPort"]
    assert int(env["OPSLOOP_LOOP_PORT"]) == port
    assert (
        env["OPSLOOP_LOOP_RUNNER"]
        in settings.LoopSettings.model_fields["runner"].annotation.__args__
    )
    app = (Path(settings.__file__).parent / "app.py").read_text()
    for probe in ("readinessProbe", "livenessProbe"):
        assert f'"{container[probe]["httpGet"]["path"]}"' in app
    # Alertmanager posts the quality alerts to the loop's Service.
    service = objects["Service", "opsloop-loop"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == port
    assert '"/alerts"' in app


def job_from_the_cluster(overlay: str, run_id: int, tmp_path: Path) -> dict[str, Any]:
    """The Job the loop creates for run `run_id` in a cluster running `overlay`: its runner reads
    the CronJob the overlay applied (`kubectl get`, here a stand-in that prints the rendered
    object as the API server would) and creates the run's Job (kept by the stand-in)."""
    from opsloop.loop.runner import KubernetesRunner
    from opsloop.loop.settings import load_loop_settings

    objects = rendered(overlay)
    loop = objects["Deployment", "opsloop-loop"]["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v.get("value") for v in loop["env"]}
    kind, _, name = env["OPSLOOP_LOOP_JOB_TEMPLATE"].partition("/")
    applied = tmp_path / "applied.json"
    applied.write_text(json.dumps(objects[{"cronjob": "CronJob"}[kind], name]))
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        f"#!/bin/sh\n[ \"$1 $2\" = 'get {kind}/{name}' ] && exec cat {applied}\n"
        f"[ \"$1 $2 $3\" = 'create -f -' ] && exec cat > {tmp_path / 'created.yaml'}\nexit 3\n"
    )
    kubectl.chmod(0o755)
    settings = load_loop_settings(
        runner=env["OPSLOOP_LOOP_RUNNER"],
        job_template=env["OPSLOOP_LOOP_JOB_TEMPLATE"],
        kubectl=str(kubectl),
    )
    KubernetesRunner(settings).start(run_id)
    return yaml.safe_load((tmp_path / "created.yaml").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/production"])
def test_the_loop_retrains_in_a_job_of_the_overlays_train_image(
    overlay: str, tmp_path: Path
) -> None:
    job = job_from_the_cluster(overlay, 5, tmp_path)
    job["metadata"]["namespace"] = "opsloop"  # kubectl creates it in the loop's namespace
    validate_object(job)
    assert job["kind"] == "Job"
    assert job["metadata"]["name"] == "opsloop-retrain-run-5"
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["args"] == ["loop", "retrain", "--run", "5"]
    # The overlay's train image, never the base's placeholder name.
    train = rendered(overlay)["CronJob", "opsloop-retrain"]
    expected = pod_specs(train)[0]["containers"][0]["image"]
    assert container["image"] == expected
    assert "/opsloop-train:" in container["image"]
    assert {c["image"] for c in spec["initContainers"]} == {expected}
    # What `opsloop loop retrain` reads: the loop database and the prediction log (the
    # controller's), the tracking server, the workspace, the overrides (the ConfigMap).
    env = {v["name"]: v for v in container["env"]}
    assert env["OPSLOOP_LOOP_DB_URL"]["valueFrom"]["secretKeyRef"]["key"] == "loop-db-url"
    assert env["OPSLOOP_PREDLOG_URL"]["valueFrom"]["secretKeyRef"]["key"] == "predlog-url"
    assert env["OPSLOOP_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["key"] == "tracking-uri"
    assert unknown_variables(list(env)) == set()
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["opsloop-config"]
    config = rendered(overlay)["ConfigMap", "opsloop-config"]["data"]
    overrides = config["OPSLOOP_LOOP_OVERRIDES"].split()
    cfg = load_config(["data=production", *overrides])  # valid keys and values
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert cfg.registry.bundle_dir in mounts  # a promotion writes the bundle the API serves
    assert env["OPSLOOP_LOOP_WORKSPACE"]["value"] in mounts
    # The base dataset is prepared into the same workspace before the run.
    [data] = spec["initContainers"]
    assert data["args"] == ["data"]
    assert env["OPSLOOP_LOOP_WORKSPACE"]["value"] in {m["mountPath"] for m in data["volumeMounts"]}
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0  # a failed run is recorded; the loop decides again


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/production"])
def test_the_loop_may_read_its_template_and_create_jobs(overlay: str) -> None:
    objects = rendered(overlay)
    pod = objects["Deployment", "opsloop-loop"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {v["name"]: v for v in container["env"]}
    assert env["OPSLOOP_LOOP_RUNNER"]["value"] == "kubernetes"
    template = env["OPSLOOP_LOOP_JOB_TEMPLATE"]["value"]
    assert template == f"{CLUSTER_TEMPLATE_PREFIX}opsloop-retrain"
    assert ("CronJob", template.partition("/")[2]) in objects
    assert "/opsloop-loop:" in container["image"]
    # kubectl in the pod runs as its service account, whose Role may do exactly that.
    assert pod.get("automountServiceAccountToken", True) is True
    account = pod["serviceAccountName"]
    [binding] = [
        r for r in objects.values()
        if r["kind"] == "RoleBinding" and r["subjects"][0]["name"] == account
    ]  # fmt: skip
    rules = objects["Role", binding["roleRef"]["name"]]["rules"]
    assert {"apiGroups": ["batch"], "resources": ["cronjobs"], "resourceNames": ["opsloop-retrain"],
            "verbs": ["get"]} in rules  # fmt: skip
    assert any(r["resources"] == ["jobs"] and "create" in r["verbs"] for r in rules)
    # The controller and its Jobs share the loop database; alerts need the loop's token.
    assert env["OPSLOOP_LOOP_DB_URL"]["valueFrom"]["secretKeyRef"]["key"] == "loop-db-url"
    assert "optional" not in env["OPSLOOP_LOOP_DB_URL"]["valueFrom"]["secretKeyRef"]
    assert env["OPSLOOP_LOOP_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "loop-token"
    monitor = objects["Service", "opsloop-monitor"]
    assert env["OPSLOOP_LOOP_MONITOR_URL"]["value"] == (
        f"http://{monitor['metadata']['name']}:{monitor['spec']['ports'][0]['port']}"
    )
    # HOME is /tmp in the image, a writable emptyDir here: kubectl's cache.
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models" in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/production"])
def test_the_ui_runs_non_root_probed_and_wired(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = objects["Deployment", "opsloop-ui"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/opsloop-ui:" in container["image"]
    # Streamlit's own health route, on the container's port, for every probe.
    port = container["ports"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/_stcore/health", "port": port["name"]}
    env = {v["name"]: v for v in container["env"]}
    assert int(env["OPSLOOP_UI_PORT"]["value"]) == port["containerPort"]
    assert env["OPSLOOP_UI_HOST"]["value"] == "0.0.0.0"
    assert unknown_variables(list(env)) == set()
    # HOME on an emptyDir: the only writable places are volumes.
    assert env["HOME"]["value"] == "/tmp"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # It talks to the API and the monitor through their Services and reads the stores.
    for variable, name in (("SERVER", "opsloop-serve"), ("MONITOR", "opsloop-monitor")):
        service = objects["Service", name]
        assert env[f"OPSLOOP_UI_{variable}_URL"]["value"] == (
            f"http://{name}:{service['spec']['ports'][0]['port']}"
        )
    for variable, key in (("TRACKING_URI", "tracking-uri"), ("PREDLOG_URL", "predlog-url"),
                          ("LOOP_DB_URL", "loop-db-url")):  # fmt: skip
        assert env[f"OPSLOOP_UI_{variable}"]["valueFrom"]["secretKeyRef"]["key"] == key
    assert env["OPSLOOP_UI_BUNDLE_PATH"]["value"].startswith("/models/")
    assert mounts["/models"] == "models"
    service = objects["Service", "opsloop-ui"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_local_overlay_shares_sqlite_with_the_loop_the_app_and_the_jobs() -> None:
    objects = rendered("overlays/local")
    secret = objects["Secret", "opsloop-secrets"]["stringData"]
    for key in ("predlog-url", "loop-db-url"):
        assert secret[key].startswith("sqlite:////data/"), key
    assert secret["loop-token"]
    pods = [objects["Deployment", name]["spec"]["template"]["spec"]
            for name in ("opsloop-loop", "opsloop-ui")]  # fmt: skip
    pods.append(pod_specs(objects["CronJob", "opsloop-retrain"])[0])
    for spec in pods:
        assert "/data" in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
        assert "opsloop-data" in claims


def test_production_scrapes_the_loop_and_documents_its_secret_keys() -> None:
    objects = rendered("overlays/production")
    monitor = objects["ServiceMonitor", "opsloop-loop"]
    service = objects["Service", "opsloop-loop"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod = objects["Deployment", "opsloop-loop"]["spec"]["template"]["metadata"]
    assert "annotations" not in pod  # scraped by the ServiceMonitor instead
    # Every key a pod reads from the Secret (which production keeps out of git) is documented.
    comment = (K8S / "overlays" / "production" / "kustomization.yaml").read_text()
    keys = {
        variable["valueFrom"]["secretKeyRef"]["key"]
        for resource in objects.values()
        for spec in pod_specs(resource)
        for container in spec["containers"]
        for variable in container.get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    }
    assert {"loop-db-url", "loop-token", "predlog-url", "tracking-uri"} <= keys
    for key in keys:
        assert f"#   {key} " in comment, key
