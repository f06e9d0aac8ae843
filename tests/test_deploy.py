"""deploy/: Prometheus config and alert rules (promtool), Grafana dashboards.

The alert rules and dashboards may only use metric names the API and the monitor really export;
`promtool test rules` runs the rule unit tests. The compose file, images, Kubernetes and cloud
files are tested in tests/deploy/ and tests/integration/test_containers.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from opsloop.monitor.metrics import MonitorMetrics
from opsloop.monitor.quality import QualityReport
from opsloop.serve.metrics import ServeMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)
METRIC = re.compile(r"\bopsloop_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every sample name the API and the monitor expose, after one of each kind of event."""
    serve = ServeMetrics()
    serve.observe_request("/v2/models/{model_name}/infer", 200, 0.01)
    serve.observe_batch(2, 0.001)
    serve.observe_predictions(np.array([[0.1, 0.9]], np.float32), ["a", "b"])
    serve.reject("/predict", "bad_image")
    serve.model_loaded("digits", "1", None)
    serve.predlog_rows.inc()
    serve.routed.labels("canary").inc()
    serve.shadow_rows.labels("logged").inc()
    monitor = MonitorMetrics()
    monitor.record_quality(quality_report())
    monitor.rollbacks.labels("digits").inc()
    names = set()
    for registry in (serve.registry, monitor.registry):
        for family in registry.collect():
            names |= {sample.name for sample in family.samples}
    return names


def quality_report() -> QualityReport:
    """A quality report with a champion, a labelled shadow challenger and an estimate."""
    from opsloop.monitor.quality import Estimate, assess_quality
    from opsloop.predictions import LoggedPredictions

    n = 4
    window = LoggedPredictions(
        request_ids=["a", "b", "a", "b"],
        items=np.zeros(n, np.int64),
        created_at=np.arange(n, dtype=np.float64),
        model_names=["digits"] * n,
        model_versions=["1", "1", "2", "2"],
        roles=["champion", "champion", "shadow", "shadow"],
        endpoints=["infer"] * n,
        inputs=[np.zeros((1, 8, 8), np.float32)] * n,
        probabilities=np.eye(2, dtype=np.float32)[[0, 1, 0, 0]],
        embeddings=np.zeros((n, 2), np.float32),
        labels=np.array([0, 1, 0, 0]),
        latency_ms=np.ones(n),
        true_labels=np.array([0, 1, 0, 1]),
        labelled_at=np.arange(n, dtype=np.float64) + 1,
    )
    report = assess_quality(window)
    estimate = Estimate("1", 0.9, n, "shift-regression")
    return dataclasses.replace(report, estimates=[estimate])


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [target["expr"] for target in panel.get("targets", [])]
    return exprs


def test_alert_rules_and_dashboards_use_only_exported_metric_names() -> None:
    exported = exported_names()
    assert "opsloop_requests_total" in exported
    assert "opsloop_drift_detector_detected" in exported
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used - exported == set()
    assert len(used) >= 15


def test_alert_rules_cover_the_issue() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    wanted = {
        "OpsloopHighErrorRate",
        "OpsloopHighLatencyP99",
        "OpsloopDriftDetected",
        "OpsloopNoPredictions",
        "OpsloopModelNotReady",
    }
    assert wanted <= rules.keys()
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


@needs_promtool
def test_alert_rule_unit_tests_pass() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 rules found" in result.stdout
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"opsloop-api", "opsloop-monitor"} <= jobs


def test_grafana_dashboard_and_provisioning_agree() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uids = {source["uid"] for source in datasource["datasources"]}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "opsloop.json").read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("requests", "latency", "batch size", "class distribution", "confidence", "drift"):
        assert topic in titles, topic
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids
            assert panel["targets"], panel["title"]
    provider = yaml.safe_load((provisioning / "dashboards" / "opsloop.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
