"""A real Prometheus (Debian's package) scrapes a real `opsloop serve` and the drift monitor.

Both run on 127.0.0.1 on free ports; Prometheus gets a temporary config built from
deploy/prometheus/ (same jobs and alert rules, loopback targets, a 1 s scrape interval) and its
own storage under tmp_path, and is stopped by PID. Skipped where `prometheus` is not installed
(`.ci/run` installs it).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import yaml

from tests.integration.processes import OPSLOOP, free_port, running, serving_bundle

if TYPE_CHECKING:
    from opsloop.export import ExportResult

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="the prometheus binary is not installed (apt-get install prometheus)",
    ),
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
QUERY_TIMEOUT_S = 90


def loopback_config(tmp_path: Path, api: str, monitor: str) -> Path:
    """deploy/prometheus/prometheus.yml with loopback targets, fast scrapes, no Alertmanager."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {"opsloop-api": api, "opsloop-monitor": monitor}
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("alerting")
    config["scrape_configs"] = [
        job | {"static_configs": [{"targets": [targets[job["job_name"]]]}]}
        for job in config["scrape_configs"]
        if job["job_name"] in targets
    ]
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def query(base: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_the_api_and_the_monitor(bundle: ExportResult, tmp_path: Path) -> None:
    predlog = f"sqlite:///{tmp_path / 'predictions.db'}"
    monitor_port, prometheus_port = free_port(), free_port()
    monitor_env = {"OPSLOOP_MONITOR_PORT": str(monitor_port)}
    monitor_cmd = [*OPSLOOP, "monitor", "serve", "--bundle", str(bundle.path), "--log", predlog]
    with (
        serving_bundle(bundle.path, tmp_path, predlog) as api,
        running(monitor_cmd, tmp_path / "monitor.log", monitor_env) as monitor,
    ):
        monitor.wait_for_http(f"http://127.0.0.1:{monitor_port}/health")
        pixels = np.full((3, 1, 8, 8), 8.0, np.float32)
        body = {
            "inputs": [
                {"name": "pixels", "shape": [3, 1, 8, 8], "datatype": "FP32",
                 "data": pixels.ravel().tolist()}
            ]
        }  # fmt: skip
        assert httpx.post(f"{api}/v2/models/digits/infer", json=body, timeout=10).is_success
        config = loopback_config(tmp_path, api.removeprefix("http://"), f"127.0.0.1:{monitor_port}")
        command = [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]
        base = f"http://127.0.0.1:{prometheus_port}"
        with running(command, tmp_path / "prometheus.log", {}) as prometheus:
            prometheus.wait_for_http(f"{base}/-/ready")
            samples: dict[str, list[dict[str, Any]]] = {}

            def scraped() -> bool:
                samples["model"] = query(base, 'opsloop_model_info{job="opsloop-api"}')
                samples["predictions"] = query(base, "sum(opsloop_predictions_total)")
                samples["monitor"] = query(base, 'opsloop_drift_min_samples{job="opsloop-monitor"}')
                return bool(samples["model"] and samples["predictions"] and samples["monitor"])

            prometheus.wait_until(scraped, "scraped opsloop metrics", timeout=QUERY_TIMEOUT_S)
            model = samples["model"][0]
            assert model["metric"]["model_name"] == "digits"
            assert model["metric"]["model_version"] == "3"
            assert float(model["value"][1]) == 1.0
            assert float(samples["predictions"][0]["value"][1]) == 3.0
            assert float(samples["monitor"][0]["value"][1]) == 30.0
            up = {r["metric"]["job"]: r["value"][1] for r in query(base, "up")}
            assert up == {"opsloop-api": "1", "opsloop-monitor": "1"}
            rules = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            names = {rule["name"] for group in rules for rule in group["rules"]}
            assert {"OpsloopDriftDetected", "OpsloopModelNotReady"} <= names
            # Loaded and evaluated against live data: the API serves a model, so it is quiet.
            time.sleep(2)
            alerts = httpx.get(f"{base}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            assert "OpsloopModelNotReady" not in {a["labels"]["alertname"] for a in alerts}
