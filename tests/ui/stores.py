"""Real stores for the app's tests: a prediction log written by the real server (the bundle's
model answering real requests, labels posted to /feedback), and an MLflow registry holding
versions, aliases and a promotion history as the gate records them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from opsloop.bundle import read_bundle_manifest
from opsloop.errors import OpsloopError
from opsloop.predictions import read_predictions
from opsloop.registry.gate import PromotionDecision
from opsloop.registry.versions import HISTORY_TAG
from opsloop.serve.app import create_app
from opsloop.serve.settings import load_settings
from tests.ui.conftest import serving

MODEL = "digits-cnn"


def log_answers(
    url: str,
    bundle: Path,
    images: npt.NDArray[Any],
    *,
    prefix: str,
    scratch: Path,
    labels: npt.NDArray[np.int64] | None = None,
) -> list[str]:
    """Serve `bundle` on 127.0.0.1, send each image as a V2 infer call with our own id (and its
    label to /feedback when `labels` are given), stop the server; returns the request ids once
    the log holds them all."""
    settings = load_settings(
        bundle_path=bundle,
        workspace=scratch,
        predlog_url=url,
        journal_dir=scratch / f"journal-{prefix}",
        reload_poll_seconds=0,
    )
    before = count(url)
    ids = [f"{prefix}-{i}" for i in range(len(images))]
    name = read_bundle_manifest(bundle).model_name
    with serving(create_app(settings)) as server, httpx.Client(base_url=server) as client:
        for index, image in enumerate(images):
            tensor = {
                "name": "pixels",
                "shape": [1, *image.shape],
                "datatype": "FP32",
                "data": image.astype(np.float32).ravel().tolist(),
            }
            body = {"id": ids[index], "inputs": [tensor]}
            client.post(f"/v2/models/{name}/infer", json=body).raise_for_status()
            if labels is not None:
                label = {"request_id": ids[index], "label": int(labels[index])}
                client.post("/feedback", json=label).raise_for_status()
    deadline = time.monotonic() + 60
    while count(url) < before + len(images):
        assert time.monotonic() < deadline, "the answers never reached the log"
        time.sleep(0.2)
    return ids


def count(url: str) -> int:
    try:
        return len(read_predictions(url))
    except OpsloopError:  # no log yet
        return 0


def make_registry(root: Path) -> str:
    """An MLflow registry with v1 (champion, promoted first) and v2 (challenger, refused), each
    from its own run with metrics and lineage; returns its tracking URI."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("ui", artifact_location=(root / "art").as_uri())
    client.create_registered_model(MODEL)
    for version, accuracy in (("1", 0.97), ("2", 0.91)):
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, "eval/accuracy", accuracy)
        client.log_metric(run, "test/f1", accuracy - 0.01)
        lineage = {"dataset_hash": f"{version * 12}abcdef", "git_commit": f"c0ffee{version}"}
        for key, value in lineage.items():
            client.set_tag(run, key, value)
        made = client.create_model_version(MODEL, f"runs:/{run}/model", run_id=run, tags=lineage)
        assert str(made.version) == version
    client.set_registered_model_alias(MODEL, "champion", "1")
    client.set_registered_model_alias(MODEL, "challenger", "2")
    decisions = [
        decision("1", None, True, "first champion (holdout accuracy 0.9700)", "2026-01-01"),
        decision("2", "1", False, "holdout accuracy 0.9100 trails champion v1's", "2026-01-02"),
    ]
    client.set_model_version_tag(MODEL, "2", "promotion.decision", "refused")
    client.set_model_version_tag(MODEL, "2", "promotion.reason", decisions[1]["reason"])
    client.set_registered_model_tag(MODEL, HISTORY_TAG, json.dumps(decisions))
    return uri


def decision(
    version: str, champion: str | None, promoted: bool, reason: str, day: str
) -> dict[str, Any]:
    """A promotion history entry exactly as the gate stores it (`PromotionDecision` as a dict)."""
    return dataclasses.asdict(
        PromotionDecision(
            promoted=promoted,
            forced=False,
            reason=reason,
            name=MODEL,
            challenger_version=version,
            champion_version=champion,
            challenger_accuracy=0.97 if version == "1" else 0.91,
            champion_accuracy=None if champion is None else 0.97,
            challenger_latency_ms=0.5,
            accuracy_margin=0.005,
            latency_budget_ms=20.0,
            holdout="digits/test@abc",
            at=f"{day}T12:00:00+00:00",
            by="test",
        )
    )
