"""An alert travels for real: Prometheus fires it, Alertmanager routes it, the loop receives it.

A real Prometheus (Debian's package) scrapes a small exporter on 127.0.0.1 that reports a
champion's online accuracy far below its interval; a rule named like the repository's accuracy
alert fires at once; a real Alertmanager, configured with deploy/alertmanager/alertmanager.yml
(the loop's URL pointed at loopback), routes it to `opsloop loop serve`'s webhook with the loop's
bearer token (without it the loop refuses the call); the loop records a decision on the "alert"
trigger with the alert as its evidence. Skipped where the binaries are not installed (`.ci/run`
installs them).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.processes import OPSLOOP, free_port, running

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("prometheus-alertmanager") is None,
        reason="prometheus and prometheus-alertmanager are not installed (apt-get install them)",
    ),
]
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXPOSITION = (
    "# TYPE opsloop_online_accuracy_upper gauge\n"
    'opsloop_online_accuracy_upper{model_version="3",role="champion"} 0.41\n'
)


@pytest.fixture
def exporter() -> Iterator[str]:
    """What a monitor would export while the champion does badly on live labels."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = EXPOSITION.encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_accuracy_alert_reaches_the_loop(exporter: str, tmp_path: Path) -> None:
    loop_port, alertmanager_port, prometheus_port = free_port(), free_port(), free_port()
    # The repository's routing, with the loop's address on loopback.
    routing = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    [loop_receiver] = [r for r in routing["receivers"] if r["name"] == "opsloop-loop"]
    loop_receiver["webhook_configs"][0]["url"] = f"http://127.0.0.1:{loop_port}/alerts"
    # The bearer token the webhook sends, as the loop is given it in the stack: with a token the
    # loop refuses unauthenticated callers, even on loopback.
    token = loop_receiver["webhook_configs"][0]["http_config"]["authorization"]["credentials"]
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(routing))
    (tmp_path / "rules.yml").write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "test",
                        "rules": [
                            {
                                "alert": "OpsloopOnlineAccuracyDrop",
                                "expr": "opsloop_online_accuracy_upper < 0.5",
                                "labels": {"severity": "critical"},
                            }
                        ],
                    }
                ]
            }
        )
    )
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "rules.yml")],
                "alerting": {
                    "alertmanagers": [
                        {"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}
                    ]
                },
                "scrape_configs": [
                    {"job_name": "opsloop-monitor", "static_configs": [{"targets": [exporter]}]}
                ],
            }
        )
    )
    loop_env = {
        "OPSLOOP_LOOP_PORT": str(loop_port),
        "OPSLOOP_LOOP_WORKSPACE": str(tmp_path),
        "OPSLOOP_LOOP_INTERVAL_SECONDS": "3600",
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{tmp_path / 'predictions.db'}",
        "OPSLOOP_LOOP_OVERRIDES": f"data.processed_dir={tmp_path / 'processed'}",
        "OPSLOOP_LOOP_TOKEN": token,
    }
    alertmanager = [
        "prometheus-alertmanager",
        f"--config.file={tmp_path / 'alertmanager.yml'}",
        f"--storage.path={tmp_path / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{alertmanager_port}",
        "--cluster.listen-address=",
    ]
    prometheus = [
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]
    loop_url = f"http://127.0.0.1:{loop_port}"
    with (
        running([*OPSLOOP, "loop", "serve"], tmp_path / "loop.log", loop_env) as loop,
        running(alertmanager, tmp_path / "alertmanager.log", {}) as manager,
        running(prometheus, tmp_path / "prometheus.log", {}) as scraper,
    ):
        loop.wait_for_http(f"{loop_url}/health")
        assert httpx.post(f"{loop_url}/alerts", json={"alerts": []}).status_code == 401
        manager.wait_for_http(f"http://127.0.0.1:{alertmanager_port}/-/ready")
        scraper.wait_for_http(f"http://127.0.0.1:{prometheus_port}/-/ready")
        deadline = time.monotonic() + 120
        history: list[dict[str, object]] = []
        while not history:
            assert time.monotonic() < deadline, f"no alert reached the loop:\n{loop.log()}"
            history = httpx.get(f"{loop_url}/history", timeout=5).json()
            time.sleep(1)
    [decision] = history
    assert decision["trigger"] == "alert"
    assert "OpsloopOnlineAccuracyDrop firing" in str(decision["reason"]) or decision["state"]
    evidence = decision["evidence"]
    assert isinstance(evidence, dict)
    [alert] = evidence["alerts"]
    assert alert["labels"]["alertname"] == "OpsloopOnlineAccuracyDrop"
    assert alert["labels"]["model_version"] == "3"
    assert decision["state"] == "skipped"  # no labelled production data yet: nothing to run
