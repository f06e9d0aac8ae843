"""The app's HTTP side against the real serving app (in process) and against nothing at all."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from opsloop.predictions import read_predictions
from opsloop.serve.app import create_app
from opsloop.ui.client import (
    ServerClient,
    ServerRejectedError,
    ServerUnavailableError,
    read_monitor_status,
)
from tests.integration.processes import free_port
from tests.serve.inprocess import make_settings, png
from tests.serve.onnx_bundles import expected_outputs, weights_of, write_bundle
from tests.ui.conftest import serving


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The serving app over a tiny bundle (model "digits" v1) on 127.0.0.1: its URL and log."""
    settings = make_settings(tmp_path, write_bundle(tmp_path / "bundle", version="1", seed=0))
    with serving(create_app(settings)) as url:
        yield url, settings.resolved_predlog_url()


def client_of(url: str, model: str = "digits", **options: str) -> ServerClient:
    return ServerClient(url, model, **options)


def test_metadata_infer_and_feedback_join_in_the_log(served: tuple[str, str]) -> None:
    url, log_url = served
    client = client_of(url)
    model = client.model()
    assert (model.name, model.version, model.input_name) == ("digits", "1", "pixels")
    assert model.item_shape == (1, 8, 8)
    assert model.class_names == tuple(str(i) for i in range(10))
    pixels = np.random.default_rng(3).random((1, 8, 8)).astype(np.float32) * 16
    answer = client.infer(pixels, model)
    expected, _ = expected_outputs(weights_of(0), pixels[None])
    assert answer.label == int(expected[0].argmax())
    np.testing.assert_allclose(answer.probabilities, expected[0], atol=1e-6)
    assert (answer.model_version, answer.role, answer.endpoint) == ("1", "champion", "infer")
    assert client.send_feedback(answer.request_id, 7) == 1
    deadline = time.monotonic() + 30  # the log is written off the hot path, soon after
    while True:
        logged = read_predictions(log_url, request_id=answer.request_id)
        if len(logged) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert list(logged.true_labels) == [7]
    assert list(logged.labels) == [answer.label]


def test_an_image_file_goes_to_predict(served: tuple[str, str]) -> None:
    answer = client_of(served[0]).predict_image(png(), "bar.png")
    assert answer.endpoint == "predict"
    assert answer.class_name == str(answer.label)
    assert answer.confidence == max(answer.probabilities)
    assert sum(answer.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert answer.request_id  # the id the server made, to post its label with


def test_the_servers_own_reasons_come_back_in_one_line(served: tuple[str, str]) -> None:
    url, _ = served
    with pytest.raises(ServerRejectedError, match="OPSLOOP_UI_MODEL_NAME") as unknown:
        client_of(url, "nope").model()
    assert unknown.value.status == 404
    with pytest.raises(ServerRejectedError, match="not a class of the served model") as label:
        client_of(url).send_feedback("some-request", 42)
    assert label.value.status == 422
    with pytest.raises(ServerRejectedError, match=r"refused: .*(decode|image)") as image:
        client_of(url).predict_image(b"not an image")
    assert image.value.status in (400, 415)


def test_a_feedback_token_is_sent_when_configured(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    settings = make_settings(tmp_path, bundle, feedback_token="labels-only")
    with serving(create_app(settings)) as url:
        answer = client_of(url).predict_image(png())
        with pytest.raises(ServerRejectedError, match="missing feedback token"):
            client_of(url).send_feedback(answer.request_id, 1)
        allowed = client_of(url, feedback_token="labels-only")
        assert allowed.send_feedback(answer.request_id, 1) == 1


def test_a_server_that_is_down_is_one_line_saying_how_to_start_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        ServerClient(url, "digits", timeout=2) as client,
        pytest.raises(
            ServerUnavailableError, match=rf"inference server at {url} is not answering"
        ) as caught,
    ):
        client.model()
    assert "opsloop serve" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_monitor_that_is_down_says_how_to_start_or_switch_it_off() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailableError, match="OPSLOOP_UI_MONITOR_URL=none"):
        read_monitor_status(url, timeout=2)
