"""The whole app in process: lifespan, readiness, hot reload, metrics and the prediction log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from fastapi import FastAPI

from opsloop.predictions import read_predictions
from opsloop.serve.app import create_app
from tests.serve.inprocess import INFER, TOKEN, infer_body, make_settings, metric, png, running
from tests.serve.onnx_bundles import write_bundle

pytestmark = pytest.mark.anyio


async def test_not_loaded_yet_is_503_and_the_server_still_answers(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, tmp_path / "not-exported-yet"))
    async for client in running(app):
        assert (await client.get("/v2/health/live")).status_code == 200
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "model not loaded yet" in ready.json()["error"]
        assert "opsloop export" in ready.json()["error"]
        for response in (
            await client.post(INFER, json=infer_body(np.ones((1, 1, 8, 8), np.float32))),
            await client.post("/predict", files={"file": ("d.png", png(), "image/png")}),
            await client.get("/v2/models/digits"),
        ):
            assert response.status_code == 503
            assert "model not loaded yet" in response.json()["error"]


# --- reload -------------------------------------------------------------------------------------


async def test_the_poller_follows_the_bundle_path(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, reload_poll_seconds=0.05))
    async for client in running(app):
        write_bundle(tiny_bundle, version="2", seed=1)
        for _ in range(200):
            response = await client.post(INFER, json=infer_body(pixels))
            assert response.status_code == 200
            if response.json()["model_version"] == "2":
                break
            await asyncio.sleep(0.02)
        assert response.json()["model_version"] == "2"


async def test_requests_in_flight_during_a_swap_all_succeed(
    client: httpx.AsyncClient, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    swapped = asyncio.Event()

    async def hammer() -> list[str]:
        """Requests until five have been answered after the reload returned."""
        versions, after_swap = [], 0
        while after_swap < 5:
            response = await client.post(INFER, json=infer_body(pixels[:1]))
            assert response.status_code == 200
            versions.append(response.json()["model_version"])
            after_swap += swapped.is_set()
        return versions

    async def swap() -> None:
        try:
            await asyncio.sleep(0.05)
            write_bundle(tiny_bundle, version="2", seed=1)
            reload = await client.post(
                "/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}
            )
            assert reload.status_code == 200
        finally:
            swapped.set()

    results = await asyncio.gather(*(hammer() for _ in range(8)), swap())
    versions = [v for result in results[:-1] for v in result]
    assert set(versions) == {"1", "2"}
    assert versions[-1] == "2"


# --- metrics and the prediction log ------------------------------------------------------------


async def test_metrics_count_requests_batches_predictions_and_rejections(
    client: httpx.AsyncClient, pixels: npt.NDArray[np.float32]
) -> None:
    for _ in range(3):
        await client.post(INFER, json=infer_body(pixels))
    await client.post(INFER, content=b"{")
    await client.post("/predict", files={"file": ("d.png", png(), "image/png")})
    text = (await client.get("/metrics")).text
    assert (
        metric(
            text, 'opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="200"}'
        )
        == 3
    )
    assert (
        metric(
            text, 'opsloop_requests_total{endpoint="/v2/models/{model_name}/infer",status="400"}'
        )
        == 1
    )
    assert metric(text, 'opsloop_requests_total{endpoint="/predict",status="200"}') == 1
    assert (
        metric(
            text,
            'opsloop_rejected_inputs_total{endpoint="/v2/models/{model_name}/infer",reason="malformed_json"}',
        )
        == 1
    )
    assert (
        metric(
            text, 'opsloop_request_latency_seconds_count{endpoint="/v2/models/{model_name}/infer"}'
        )
        == 4
    )
    assert metric(text, "opsloop_batch_size_sum") >= 16  # 3x5 rows + 1 image (+ warm-up free)
    assert metric(text, "opsloop_inference_seconds_count") >= 4
    assert metric(text, "opsloop_prediction_confidence_count") == 16
    assert (
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("opsloop_predictions_total{")
        )
        == 16
    )
    assert metric(text, 'opsloop_model_info{model_name="digits",model_version="1"}') == 1


async def test_every_prediction_is_logged_as_the_model_saw_it(
    app: FastAPI, tmp_path: Path, pixels: npt.NDArray[np.float32]
) -> None:
    async for client in running(app):
        infer = await client.post(INFER, json=infer_body(pixels, id="batch-of-5"))
        upload = await client.post("/predict", files={"file": ("d.png", png(), "image/png")})
    # The lifespan has ended: the log was flushed on shutdown.
    logged = read_predictions(f"sqlite:///{tmp_path / 'predictions.db'}")
    assert logged.request_ids == ["batch-of-5"] * 5 + [upload.json()["request_id"]]
    assert logged.items.tolist() == [0, 1, 2, 3, 4, 0]
    assert logged.endpoints == ["infer"] * 5 + ["predict"]
    assert set(logged.model_versions) == {"1"}
    for item in range(5):
        np.testing.assert_allclose(logged.inputs[item], pixels[item], rtol=1e-6)
    probabilities = np.array(infer.json()["outputs"][0]["data"], np.float32).reshape(5, 10)
    np.testing.assert_allclose(logged.probabilities[:5], probabilities, rtol=1e-6)
    assert logged.labels[:5].tolist() == infer.json()["outputs"][1]["data"]
    assert logged.embeddings.shape == (6, 16)
    assert (logged.latency_ms > 0).all()
    assert logged.inputs[5].shape == (1, 8, 8)
    assert logged.labels[5] == upload.json()["label"]


async def test_the_log_can_be_switched_off(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, predlog_url="none"))
    async for client in running(app):
        assert (await client.post(INFER, json=infer_body(pixels))).status_code == 200
    assert not (tmp_path / "predictions.db").exists()


async def test_embeddings_are_logged_on_the_bundles_log_basis(
    tmp_path: Path, pixels: npt.NDArray[np.float32]
) -> None:
    from opsloop.bundle import load_bundle
    from tests.serve.onnx_bundles import expected_outputs, weights_of

    bundle = write_bundle(tmp_path / "bundle", version="1", seed=3, log_basis=True)
    basis = load_bundle(bundle).load_log_basis()
    assert basis is not None
    app = create_app(make_settings(tmp_path, bundle))
    async for client in running(app):
        assert (await client.post(INFER, json=infer_body(pixels))).status_code == 200
    logged = read_predictions(f"sqlite:///{tmp_path / 'predictions.db'}")
    _, embedding = expected_outputs(weights_of(3), pixels)
    assert logged.embeddings.shape == (len(pixels), basis.width)  # 8 numbers, not 16
    np.testing.assert_allclose(logged.embeddings, basis.project(embedding), rtol=2e-3, atol=2e-3)


async def test_sampling_logs_a_share_and_records_it(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, predlog_sample=0.25))
    async for client in running(app):
        for _ in range(200):
            assert (await client.post(INFER, json=infer_body(pixels[:1]))).status_code == 200
        text = (await client.get("/metrics")).text
    logged = read_predictions(f"sqlite:///{tmp_path / 'predictions.db'}")
    assert 20 <= len(logged) <= 80  # about a quarter of 200 (binomial: far inside 6 sigma)
    assert set(logged.sample_rates.tolist()) == {0.25}
    assert logged.served == pytest.approx(4 * len(logged))
    assert metric(text, "opsloop_predlog_unsampled_rows_total") == 200 - len(logged)


async def test_the_readiness_body_never_shows_a_url_password(tmp_path: Path) -> None:
    from opsloop.errors import TrackingError

    class Unreachable:
        def describe(self) -> str:
            return "registry model digits@champion"

        def locate(self) -> Path:
            raise TrackingError("cannot reach the registry at postgresql://u:hunter2@db/mlflow")

    app = create_app(make_settings(tmp_path, tmp_path / "unused"), source=Unreachable())
    async for client in running(app):
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "postgresql://u:***@db/mlflow" in ready.json()["error"]
        assert "hunter2" not in ready.text


@pytest.mark.parametrize(("setting", "inline"), [("auto", True), ("true", False), ("false", True)])
async def test_a_small_model_runs_on_the_event_loop_unless_told_otherwise(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32], setting: str, inline: bool
) -> None:
    app = create_app(make_settings(tmp_path, tiny_bundle, inference_thread=setting))
    async for client in running(app):
        assert (await client.post(INFER, json=infer_body(pixels))).status_code == 200
        served = app.state.serve.manager.current
        assert (served.batcher.executor is None) == inline  # the tiny model: well under 1 ms
