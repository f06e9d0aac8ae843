"""`opsloop serve` as a real uvicorn server on 127.0.0.1, driven by concurrent clients.

Batches larger than one form under load and give the same answers as unbatched requests; a model
swapped under load fails no request; metrics aggregate across two workers; the prediction log
matches the requests and survives a restart; Triton's own client works; and the serving path
never imports torch, Lightning or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from opsloop.predictions import read_predictions
from tests.serve.onnx_bundles import expected_outputs, weights_of, write_bundle

pytestmark = pytest.mark.integration

TOKEN = "integration-token"
START_TIMEOUT_S = 180  # worker start-up imports take a while on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Child processes of `pid` (the workers start their own process groups)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


class Server:
    """One `opsloop serve` process tree, always stopped by PID."""

    def __init__(
        self, tmp_path: Path, bundle: Path, *, port: int | None = None, **env: str
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self.predlog_url = f"sqlite:///{tmp_path / 'predictions.db'}"
        self.env = {
            **os.environ,
            "OPSLOOP_BUNDLE_PATH": str(bundle),
            "OPSLOOP_PORT": str(self.port),
            "OPSLOOP_WORKERS": "2",
            "OPSLOOP_WORKSPACE": str(tmp_path),
            "OPSLOOP_PREDLOG_URL": self.predlog_url,
            "OPSLOOP_PREDLOG_FLUSH_MS": "50",
            "OPSLOOP_ADMIN_TOKEN": TOKEN,
            "OPSLOOP_RELOAD_POLL_SECONDS": "0.3",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())",
                 "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    self.wait_for_all_workers()
                    return self
            time.sleep(0.25)
        raise AssertionError(f"server not ready after {START_TIMEOUT_S}s:\n{self.log()}")

    def wait_for_all_workers(self) -> None:
        """Ready once: the other worker may still be starting; wait for its start-up line."""
        workers = int(self.env["OPSLOOP_WORKERS"])
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.log().count("Application startup complete") < workers:
            if time.monotonic() > deadline:
                raise AssertionError(f"workers did not all start:\n{self.log()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM (graceful: drain, flush the log), then SIGKILL whatever is left, by PID."""
        if self.process is None or self.process.poll() is not None:
            return
        workers = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def serving(tmp_path: Path, bundle: Path, **env: str) -> Iterator[Server]:
    server = Server(tmp_path, bundle, **env)
    try:
        yield server.start()
    finally:
        server.stop()


def infer_body(pixels: npt.NDArray[np.float32], request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    return body


def samples(count: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return (np.random.default_rng(seed).random((count, 1, 8, 8)) * 16).astype(np.float32)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Every sample of metric `name` as {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def infer_ok(client: httpx.Client, pixels: npt.NDArray[np.float32], **kw: Any) -> dict[str, Any]:
    response = client.post("/v2/models/digits/infer", json=infer_body(pixels, **kw))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers serving version 1 of the tiny model."""
    tmp_path = tmp_path_factory.mktemp("serve-shared")
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    with serving(tmp_path, bundle) as server:
        yield server


@pytest.mark.slow
def test_concurrent_requests_form_batches_with_unbatched_results(shared: Server) -> None:
    inputs = samples(64)
    with httpx.Client(base_url=shared.url, timeout=30) as client:
        unbatched = np.array(
            [infer_ok(client, inputs[i : i + 1])["outputs"][0]["data"] for i in range(64)]
        )
        before = metric_samples(client.get("/metrics").text, "opsloop_batch_size")
    expected, _ = expected_outputs(weights_of(0), inputs)
    np.testing.assert_allclose(unbatched, expected, atol=1e-5)

    def one_client(offset: int) -> list[tuple[int, list[float]]]:
        answers = []
        with httpx.Client(base_url=shared.url, timeout=30) as client:
            for k in range(24):
                i = (offset + k) % 64
                answers.append((i, infer_ok(client, inputs[i : i + 1])["outputs"][0]["data"]))
        return answers

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = [a for answers in pool.map(one_client, range(0, 64, 2)) for a in answers]
    assert len(results) == 32 * 24
    for i, probabilities in results:
        np.testing.assert_allclose(probabilities, unbatched[i], atol=1e-6)

    after = metric_samples(httpx.get(f"{shared.url}/metrics").text, "opsloop_batch_size")
    batches = after["opsloop_batch_size_count"] - before["opsloop_batch_size_count"]
    singles = (
        after['opsloop_batch_size_bucket{le="1.0"}'] - before['opsloop_batch_size_bucket{le="1.0"}']
    )
    rows = after["opsloop_batch_size_sum"] - before["opsloop_batch_size_sum"]
    assert rows == len(results)
    assert batches - singles > 0, "no batch of more than one request formed"
    assert rows / batches > 1.0


@pytest.mark.slow
def test_metrics_aggregate_both_workers_and_count(shared: Server) -> None:
    def totals() -> dict[str, float]:
        return metric_samples(httpx.get(f"{shared.url}/metrics").text, "opsloop_")

    before = totals()
    with httpx.Client(base_url=shared.url, timeout=30) as client:
        for i in range(20):
            infer_ok(client, samples(2, seed=i))
        bad = client.post("/v2/models/digits/infer", content=b"{broken")
        assert bad.status_code == 400
    after = totals()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert (
        delta('opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="200"}') == 20
    )
    assert (
        delta('opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="400"}') == 1
    )
    assert (
        delta(
            'opsloop_rejected_inputs_total{endpoint="/v2/models/{model_name}/infer",reason="malformed_json"}'
        )
        == 1
    )
    assert (
        delta('opsloop_request_latency_seconds_count{endpoint="/v2/models/{model_name}/infer"}')
        == 21
    )
    assert delta("opsloop_prediction_confidence_count") == 40
    predicted = sum(delta(k) for k in after if k.startswith("opsloop_predictions_total{"))
    assert predicted == 40
    assert delta("opsloop_inference_seconds_count") >= 1
    assert after['opsloop_model_info{model_name="digits",model_version="1"}'] == 1
    # Both workers loaded the model: two (live) reloads counted, summed across processes.
    assert after['opsloop_model_reloads_total{outcome="loaded"}'] == 2


@pytest.mark.slow
def test_predict_and_bad_input_over_real_http(shared: Server) -> None:
    import io

    from PIL import Image

    canvas = np.zeros((280, 280), dtype=np.uint8)
    canvas[40:240, 120:160] = 255
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    with httpx.Client(base_url=shared.url, timeout=30) as client:
        response = client.post("/predict", files={"file": ("digit.png", buffer.getvalue())})
        assert response.status_code == 200
        assert response.json()["model_version"] == "1"
        oversized = client.post("/v2/models/digits/infer", content=b" " * (5 * 1024 * 1024))
        assert oversized.status_code == 413
        unknown = client.post("/v2/models/other/infer", json=infer_body(samples(1)))
        assert unknown.status_code == 404
        assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_tritons_http_client_gets_correct_predictions(shared: Server) -> None:
    httpclient = pytest.importorskip(
        "tritonclient.http", reason="tritonclient[http] is not installed"
    )
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{shared.port}")
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"][0]["shape"] == [-1, 1, 8, 8]
    inputs = samples(6, seed=3)
    expected, _ = expected_outputs(weights_of(0), inputs)
    for binary in (True, False):
        tensor = httpclient.InferInput("pixels", list(inputs.shape), "FP32")
        tensor.set_data_from_numpy(inputs, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("label", binary_data=binary),
        ]
        result = client.infer("digits", [tensor], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(axis=1))
        assert result.get_response()["model_version"] == "1"
    # Naming no outputs gets every output the metadata lists, as from Triton itself. (The client
    # sends no content type at all: the server takes that as the protocol's JSON.)
    tensor = httpclient.InferInput("pixels", list(inputs.shape), "FP32")
    tensor.set_data_from_numpy(inputs, binary_data=True)
    result = client.infer("digits", [tensor])
    returned = [output["name"] for output in result.get_response()["outputs"]]
    assert returned == [output["name"] for output in metadata["outputs"]]
    assert returned == ["probabilities", "label", "embedding"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    assert result.as_numpy("embedding").shape == (6, 16)
    client.close()


@pytest.mark.slow
def test_reload_under_load_fails_no_request(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    inputs = samples(1)
    with serving(tmp_path, bundle) as server:
        stop = threading.Event()
        failures: list[str] = []
        seen: list[list[str]] = [[] for _ in range(8)]

        def load(index: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    try:
                        response = client.post("/v2/models/digits/infer", json=infer_body(inputs))
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                        continue
                    seen[index].append(response.json()["model_version"])

        threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            write_bundle(bundle, version="2", seed=1)  # both workers poll and swap
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if all(len(s) > 5 and set(s[-5:]) == {"2"} for s in seen):
                    break
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == []
        versions = [v for s in seen for v in s]
        assert {"1", "2"} <= set(versions)
        assert all(s[-1] == "2" for s in seen)

        # The admin endpoint forces a reload, behind its token.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/admin/reload").status_code == 401
            wrong = client.post("/admin/reload", headers={"authorization": "Bearer wrong"})
            assert wrong.status_code == 403
            ok = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
            assert ok.json()["model_version"] == "2"


@pytest.mark.slow
def test_prediction_log_matches_requests_and_survives_a_restart(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    first_inputs, second_inputs = samples(10, seed=1), samples(5, seed=2)
    answers: dict[str, list[float]] = {}

    def send(server: Server, inputs: npt.NDArray[np.float32], prefix: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i, row in enumerate(inputs):
                body = infer_ok(client, row[np.newaxis], request_id=f"{prefix}-{i}")
                answers[f"{prefix}-{i}"] = body["outputs"][0]["data"]

    with serving(tmp_path, bundle) as server:
        send(server, first_inputs, "first")
    url = server.predlog_url
    assert sorted(read_predictions(url).request_ids) == sorted(f"first-{i}" for i in range(10))

    with serving(tmp_path, bundle) as server:
        send(server, second_inputs, "second")
    logged = read_predictions(url)
    assert len(logged) == 15
    assert set(logged.request_ids) == set(answers)
    sent = {f"first-{i}": x for i, x in enumerate(first_inputs)} | {
        f"second-{i}": x for i, x in enumerate(second_inputs)
    }
    for position, request_id in enumerate(logged.request_ids):
        np.testing.assert_allclose(logged.inputs[position], sent[request_id], rtol=1e-6)
        np.testing.assert_allclose(logged.probabilities[position], answers[request_id], atol=1e-7)
        assert logged.model_versions[position] == "1"
        assert logged.labels[position] == int(np.argmax(answers[request_id]))


def test_the_serving_path_never_imports_torch_lightning_or_mlflow(tmp_path: Path) -> None:
    """Create the app, load a bundle and answer an infer call; then inspect sys.modules."""
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    script = f"""
import asyncio, json, sys
import httpx
from opsloop.serve.app import create_app
from opsloop.serve.settings import load_settings

app = create_app(load_settings(bundle_path={str(bundle)!r}, predlog_url="none",
                               reload_poll_seconds=0))

async def main():
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {{"inputs": [{{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                 "data": [1.0] * 64}}]}}
            response = await client.post("/v2/models/digits/infer", json=body)
            assert response.status_code == 200, response.text

asyncio.run(main())
heavy = ("torch", "lightning", "pytorch_lightning", "mlflow", "torchmetrics", "optuna")
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in heavy)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
