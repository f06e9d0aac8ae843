"""The loop service: Alertmanager's webhook starts a decision; history and metrics read the
loop database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from opsloop.loop.app import alert_trigger, create_loop_app
from opsloop.loop.controller import Controller
from opsloop.loop.settings import load_loop_settings
from tests.integration.processes import metric_value
from tests.loop.test_controller import NoRunner

FIRING = {
    "version": "4",
    "status": "firing",
    "receiver": "opsloop-loop",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "OpsloopOnlineAccuracyDrop", "model_version": "3"},
            "annotations": {"summary": "Champion v3 is less accurate on live labels"},
            "startsAt": "2026-11-30T12:00:00Z",
        },
        {"status": "firing", "labels": {"alertname": "OpsloopHighLatencyP99"}},
    ],
}


def test_only_firing_actionable_alerts_become_a_trigger() -> None:
    trigger = alert_trigger(FIRING)
    assert trigger is not None
    assert trigger.kind == "alert"
    assert trigger.reason == "Alertmanager: OpsloopOnlineAccuracyDrop firing"
    assert [a["labels"]["alertname"] for a in trigger.evidence["alerts"]] == [
        "OpsloopOnlineAccuracyDrop"
    ]
    resolved = {
        **FIRING,
        "status": "resolved",
        "alerts": [{**FIRING["alerts"][0], "status": "resolved"}],
    }
    assert alert_trigger(resolved) is None
    assert alert_trigger({"alerts": "nonsense"}) is None


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", f"sqlite:///{tmp_path / 'predictions.db'}")
    settings = load_loop_settings(
        workspace=tmp_path,
        interval_seconds=3600,  # no routine decisions during the test
        overrides=f"data.processed_dir={tmp_path / 'processed'}",
        token="hook-secret",
    )
    return TestClient(create_loop_app(Controller(settings, NoRunner())))


def test_an_alert_reaches_the_loop_and_is_recorded(client: TestClient) -> None:
    with client:
        assert client.post("/alerts", json=FIRING).status_code == 401
        headers = {"authorization": "Bearer hook-secret"}
        response = client.post("/alerts", json=FIRING, headers=headers)
        assert response.status_code == 202
        assert response.json()["accepted"] is True
        deadline = time.monotonic() + 30
        while not (history := client.get("/history").json()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        [run] = history
        assert run["trigger"] == "alert"
        assert run["state"] == "skipped"  # no labels to learn from: a limit holds it back
        assert run["evidence"]["alerts"][0]["labels"]["model_version"] == "3"
        text = client.get("/metrics").text
        assert metric_value(text, 'opsloop_loop_runs_total{outcome="skipped",trigger="alert"}') == 1
        ignored = client.post("/alerts", json={"alerts": []}, headers=headers)
        assert ignored.json() == {"accepted": False, "reason": "no actionable alert firing"}
        assert client.post("/alerts", content=b"{", headers=headers).status_code == 400
