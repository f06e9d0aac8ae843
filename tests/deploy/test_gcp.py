"""deploy/gcp/: the Cloud Run services and the Vertex AI job, checked structurally.

Nothing here can reach Google Cloud, so nothing is deployed: the files are filled in as
`envsubst` would fill them, parsed, and their Kubernetes parts (Cloud Run's containers follow
Knative's, which are Kubernetes containers) validated against Kubernetes' strict schema; images
must be Artifact Registry paths of the images `make images` builds, probes must hit real routes,
variables must be ones the services read, and the training overrides must load as a config.
"""

from __future__ import annotations

import re
from string import Template
from typing import Any

import pytest
import yaml

from opsloop.config import load_config
from tests.deploy.support import DEPLOY, serve_routes, unknown_variables, validate_part

GCP = DEPLOY / "gcp"
VALUES = {
    "PROJECT_ID": "my-project",
    "REGION": "europe-west1",
    "TAG": "0.1.0",
    "MLFLOW_URL": "https://opsloop-mlflow-abc-ew.a.run.app",
}
REGISTRY = "europe-west1-docker.pkg.dev/my-project/opsloop/"


def load(name: str) -> dict[str, Any]:
    text = (GCP / name).read_text()
    placeholders = set(re.findall(r"\$\{(\w+)\}", text))
    assert placeholders <= VALUES.keys(), f"{name}: undocumented {placeholders - VALUES.keys()}"
    return yaml.safe_load(Template(text).substitute(VALUES))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "image"), [("service.yaml", "serve"), ("mlflow.yaml", "mlflow")])
def test_cloud_run_services_are_knative_services_with_valid_containers(
    name: str, image: str
) -> None:
    service = load(name)
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["kind"] == "Service"
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert int(annotations["autoscaling.knative.dev/minScale"]) <= int(
        annotations["autoscaling.knative.dev/maxScale"]
    )
    instance = annotations["run.googleapis.com/cloudsql-instances"]
    assert instance == "my-project:europe-west1:opsloop"
    (container,) = template["spec"]["containers"]  # Cloud Run: one serving container
    validate_part(container, "container-v1")
    assert container["image"] == f"{REGISTRY}opsloop-{image}:0.1.0"
    assert len(container["ports"]) == 1
    for variable in container.get("env", []):
        if "valueFrom" in variable:  # Secret Manager: the secret's name and version
            assert variable["valueFrom"]["secretKeyRef"]["key"] == "latest"


def test_cloud_run_serves_the_bundle_from_cloud_storage() -> None:
    service = load("service.yaml")
    spec = service["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert unknown_variables(list(env)) == set()
    # The image's own OPSLOOP_PORT (8000) is where Cloud Run sends requests.
    assert container["ports"][0]["containerPort"] == 8000
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in serve_routes()
        assert container[probe]["httpGet"]["port"] == 8000
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    bundle = env["OPSLOOP_BUNDLE_PATH"]
    (volume_name,) = [name for name, path in mounts.items() if bundle.startswith(path + "/")]
    csi = volumes[volume_name]["csi"]
    assert csi["driver"] == "gcsfuse.run.googleapis.com"
    assert csi["readOnly"] is True
    assert csi["volumeAttributes"]["bucketName"] == "my-project-opsloop-models"
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations["run.googleapis.com/execution-environment"] == "gen2"
    assert "OPSLOOP_PREDLOG_URL" in env  # from Secret Manager: PostgreSQL on Cloud SQL


def test_the_vertex_job_runs_the_train_image_with_a_valid_pipeline() -> None:
    job = load("vertex-job.yaml")
    (pool,) = job["workerPoolSpecs"]
    assert pool["replicaCount"] == 1
    assert pool["machineSpec"]["machineType"]
    container = pool["containerSpec"]
    assert container["imageUri"] == f"{REGISTRY}opsloop-train:0.1.0"
    assert container["args"][0] == "pipeline"
    cfg = load_config(container["args"][1:])
    # The champion's bundle lands in the bucket Cloud Run serves from (Vertex mounts /gcs/).
    assert cfg.registry.bundle_dir == "/gcs/my-project-opsloop-models"
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    assert unknown_variables(list(env)) == set()
    assert env["OPSLOOP_TRACKING_URI"].startswith("https://")
    assert job["serviceAccount"].endswith("@my-project.iam.gserviceaccount.com")
    assert job["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://")


def test_the_mlflow_server_keeps_runs_in_cloud_sql_and_artifacts_in_cloud_storage() -> None:
    container = load("mlflow.yaml")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "server"
    assert "--artifacts-destination=gs://my-project-opsloop-mlflow" in args
    # `mlflow server` reads --backend-store-uri from this variable (a Cloud SQL socket URL).
    assert {variable["name"] for variable in container["env"]} == {"MLFLOW_BACKEND_STORE_URI"}
    assert any(arg.startswith("--allowed-hosts=") for arg in args)
