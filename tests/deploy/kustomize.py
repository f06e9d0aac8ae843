"""A small kustomize: renders deploy/k8s/ overlays without kubectl or a kustomize binary.

`kubectl kustomize` is not installable from the package registries this project can reach, so
the tests render with this subset of kustomize (the fields deploy/k8s uses: resources,
components, namespace, labels, images, JSON 6902 patches with targets, replicas) and, where
kubectl is on the machine, check that both render the same objects. A field outside the subset
fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

SUPPORTED = {
    "apiVersion", "kind", "namespace", "resources", "components", "labels", "images", "patches",
    "replicas",
}  # fmt: skip
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "IngressClass",
}  # fmt: skip
SCALABLE = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}


class KustomizeError(ValueError):
    """A kustomization this subset cannot render, or a patch that does not apply."""


def load_documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[Resource]:
    """Every object `kubectl kustomize directory` would print (order aside)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: fields outside the subset: {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else load_documents(path)
    for entry in kustomization.get("components", []):
        component = (directory / entry).resolve()
        resources = apply_component(component, resources)
    resources = transform(kustomization, directory, resources)
    keys = [identity(resource) for resource in resources]
    duplicates = {key for key in keys if keys.count(key) > 1}
    if duplicates:
        raise KustomizeError(f"{directory}: objects defined twice: {sorted(duplicates)}")
    return resources


def apply_component(directory: Path, resources: list[Resource]) -> list[Resource]:
    """A Component adds its resources to the including kustomization's, then transforms all."""
    component = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if component.get("kind") != "Component":
        raise KustomizeError(f"{directory} is not a kustomize Component")
    added = [
        doc for entry in component.get("resources", []) for doc in load_documents(directory / entry)
    ]
    return transform({**component, "resources": []}, directory, resources + added)


def transform(
    kustomization: dict[str, Any], directory: Path, resources: list[Resource]
) -> list[Resource]:
    """Patches, namespace, labels, images and replicas, in kustomize's order."""
    resources = copy.deepcopy(resources)
    for patch in kustomization.get("patches", []):
        apply_patch(patch, directory, resources)
    namespace = kustomization.get("namespace")
    if namespace:
        for resource in resources:
            set_namespace(resource, namespace)
    for label in kustomization.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise KustomizeError(
                "labels with includeSelectors/includeTemplates are outside the subset"
            )
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for resource in resources:
            set_image(resource, image)
    for replica in kustomization.get("replicas", []):
        matched = [
            r
            for r in resources
            if r["kind"] in SCALABLE and r["metadata"]["name"] == replica["name"]
        ]
        if not matched:
            raise KustomizeError(f"replicas: no workload named {replica['name']}")
        for resource in matched:
            resource["spec"]["replicas"] = replica["count"]
    return resources


def identity(resource: Resource) -> tuple[str, str, str]:
    metadata = resource["metadata"]
    return resource["kind"], metadata.get("namespace", ""), metadata["name"]


def set_namespace(resource: Resource, namespace: str) -> None:
    if resource["kind"] in CLUSTER_SCOPED:
        return
    resource["metadata"]["namespace"] = namespace
    # kustomize moves the service accounts a (Cluster)RoleBinding names along with the objects.
    for subject in resource.get("subjects", []) if resource["kind"].endswith("RoleBinding") else []:
        if subject.get("kind") == "ServiceAccount":
            subject["namespace"] = namespace


def set_image(node: Any, image: dict[str, str]) -> None:
    """Rewrite `image:` of every container under any `containers`/`initContainers` list."""
    if isinstance(node, list):
        for item in node:
            set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in {"containers", "initContainers"} and isinstance(value, list):
            for container in value:
                name, _, tag = container.get("image", "").partition(":")
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (
                        f":{new_tag}" if new_tag else ""
                    )
        set_image(value, image)


def matches(target: dict[str, str], resource: Resource) -> bool:
    """kustomize's target selector: each given field must match, names as anchored regexes."""
    for field in ("kind", "name", "namespace"):
        if field in target:
            value = resource["kind"] if field == "kind" else resource["metadata"].get(field, "")
            if not re.fullmatch(target[field], value):
                return False
    if "group" in target or "version" in target:
        group, _, version = resource["apiVersion"].rpartition("/")
        if target.get("group", group) != group or target.get("version", version) != version:
            return False
    return "labelSelector" not in target and "annotationSelector" not in target


def apply_patch(patch: dict[str, Any], directory: Path, resources: list[Resource]) -> None:
    if "target" not in patch:
        raise KustomizeError("patches without a target (strategic merge) are outside the subset")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizeError("only JSON 6902 patches (a list of operations) are in the subset")
    targets = [resource for resource in resources if matches(patch["target"], resource)]
    if not targets:
        raise KustomizeError(f"patch target {patch['target']} matches nothing")
    for resource in targets:
        for operation in operations:
            apply_operation(resource, operation)


def apply_operation(document: Resource, operation: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on `document`, in place."""
    op, path = operation["op"], operation["path"]
    if op not in {"add", "replace", "remove"}:
        raise KustomizeError(f"JSON patch op {op!r} is outside the subset")
    tokens = [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]
    parent: Any = document
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    value = copy.deepcopy(operation.get("value"))
    try:
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op == "add":
                parent.insert(index, value)
            elif op == "replace":
                parent[index] = value
            else:
                del parent[index]
        elif op == "add":
            parent[last] = value
        else:
            if last not in parent:
                raise KustomizeError(f"{op} {path}: no such field")
            if op == "replace":
                parent[last] = value
            else:
                del parent[last]
    except (IndexError, KeyError, TypeError) as exc:
        raise KustomizeError(f"{op} {path} does not apply: {exc!r}") from None
