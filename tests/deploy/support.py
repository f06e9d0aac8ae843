"""What the deployment tests share: paths, schema validation and the settings services accept."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from opsloop.config import CONFIG_DIR_ENV
from opsloop.loop.settings import LoopSettings
from opsloop.monitor.settings import MonitorSettings
from opsloop.predictions import WORKSPACE_ENV
from opsloop.serve.settings import ServeSettings
from opsloop.tracking import TRACKING_URI_ENV
from opsloop.ui.settings import UISettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes minor the manifests promise to work on (HPA v2, PDB v1, CronJob v1).
KUBERNETES_VERSION = "1.30.0"


def validate_object(resource: dict[str, Any]) -> None:
    """Validate one object against its kind's schema, strictly (unknown fields fail)."""
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@functools.cache
def _registry() -> Registry[Any]:
    definitions = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json",
        KUBERNETES_VERSION,
    )
    return Resource.from_contents(definitions) @ Registry()  # type: ignore[return-value]


def validate_part(value: Any, schema_name: str) -> None:
    """Validate part of an object (a PodSpec, a Container) against Kubernetes' strict schema,
    e.g. `schema_name="podspec-v1"`: for the Kubernetes types embedded in custom resources
    (KServe, Knative/Cloud Run) that no schema here describes whole."""
    schema = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/{schema_name}.json",
        KUBERNETES_VERSION,
    )
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    validator.validate(value)


def known_variables() -> set[str]:
    """Every environment variable opsloop's services and stages read."""
    serve = {f"OPSLOOP_{name.upper()}" for name in ServeSettings.model_fields}
    monitor = {f"OPSLOOP_MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    loop = {f"OPSLOOP_LOOP_{name.upper()}" for name in LoopSettings.model_fields}
    ui = {f"OPSLOOP_UI_{name.upper()}" for name in UISettings.model_fields}
    return serve | monitor | loop | ui | {TRACKING_URI_ENV, CONFIG_DIR_ENV, WORKSPACE_ENV}


def unknown_variables(names: list[str]) -> set[str]:
    """The OPSLOOP_* names in `names` no service reads (a typo would be silently ignored)."""
    return {name for name in names if name.startswith("OPSLOOP_")} - known_variables()


def serve_routes() -> set[str]:
    from opsloop.serve.routes import router

    return {route.path for route in router.routes}  # type: ignore[attr-defined]


def monitor_routes() -> set[str]:
    """The monitor's HTTP paths as its source declares them (building its app needs a model)."""
    source = "\n".join(path.read_text() for path in (ROOT / "src/opsloop/monitor").glob("*.py"))
    return {path for path in ("/health", "/metrics", "/drift") if f'"{path}"' in source}
