"""Every page, run headless by Streamlit's AppTest: with nothing there yet, with the server down,
and with real data: a server answering, a registry, a prediction log, a monitor, a loop history."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from opsloop.config import DataConfig
from opsloop.data import dataset_dir, load_split
from opsloop.loop.history import History
from opsloop.monitor.app import create_monitor_app
from opsloop.monitor.service import DriftMonitor
from opsloop.monitor.settings import load_monitor_settings
from opsloop.predictions import read_predictions
from opsloop.registry.gate import rollback_champion
from opsloop.serve.app import create_app
from opsloop.ui.app import APP_PATH
from tests.serve.inprocess import make_settings
from tests.ui.apptest import everything, texts
from tests.ui.conftest import PAGE_TIMEOUT_S, serving
from tests.ui.stores import MODEL, log_answers, make_registry

if TYPE_CHECKING:
    from opsloop.export import ExportResult

RunPage = Callable[[str], AppTest]


def assert_no_traceback(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]


def test_with_nothing_yet_every_page_says_what_to_run(ui_env: Path, run_page: RunPage) -> None:
    expected = {
        "models": "no model registry yet",
        "monitoring": "no prediction log yet",
        "loop": "no loop history yet",
    }
    hints = {"models": "make run", "monitoring": "opsloop serve", "loop": "opsloop loop run"}
    for page, said in expected.items():
        app = run_page(page)
        assert_no_traceback(app)
        assert not app.error, texts(app, "error")
        (info,) = texts(app, "info")
        assert info.lower().startswith(said)
        assert hints[page] in info
        assert str(ui_env) in info  # which path was looked at


def test_with_the_server_down_predict_is_one_line_not_a_traceback(
    ui_env: Path, run_page: RunPage
) -> None:
    app = run_page("predict")
    assert_no_traceback(app)
    (warning,) = texts(app, "warning")
    assert warning.startswith("The inference server at http://127.0.0.1:9 is not answering")
    assert "opsloop serve" in warning
    assert "\n" not in warning
    assert not app.tabs  # nothing to draw on without a server


def png_of(pixels: np.ndarray, pixel_max: float) -> bytes:
    grey = (pixels[0] * (255.0 / pixel_max)).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(grey).resize((64, 64), Image.Resampling.NEAREST).save(out, format="PNG")
    return out.getvalue()


def test_predict_upload_sample_and_feedback_against_a_real_server(
    ui_env: Path,
    run_page: RunPage,
    monkeypatch: pytest.MonkeyPatch,
    bundle: ExportResult,
    trained: tuple[Path, DataConfig],
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, bundle.path)
    test = load_split(dataset_dir(trained[1]), "test")
    with serving(create_app(settings)) as url:
        monkeypatch.setenv("OPSLOOP_UI_SERVER_URL", url)
        monkeypatch.setenv("OPSLOOP_UI_MODEL_NAME", "digits")
        monkeypatch.setenv("OPSLOOP_UI_BUNDLE_PATH", str(bundle.path))
        app = run_page("predict")
        assert_no_traceback(app)
        assert "Serving **digits** version **3**." in texts(app, "markdown")
        assert [tab.label for tab in app.tabs] == ["Draw", "Upload", "Samples"]
        assert len(app.button) == 10  # one per sample digit (the pad's buttons are HTML)

        app.file_uploader[0].set_value(("digit.png", png_of(test.images[0], 16.0), "image/png"))
        app.run(timeout=PAGE_TIMEOUT_S)
        assert_no_traceback(app)
        (metric,) = app.metric
        assert metric.label == "Predicted label"
        assert metric.value in [str(i) for i in range(10)]
        assert "Model **digits** version **3** (champion)" in everything(app)

        sample = next(b for b in app.button if b.label.startswith("Try "))
        truth = sample.label.removeprefix("Try ")
        sample.click().run(timeout=PAGE_TIMEOUT_S)
        assert "via `/infer`" in everything(app)
        assert app.selectbox[0].value == truth  # the held-out label is filled in
        request_id = next(
            line.split("`")[1] for line in texts(app, "markdown") if line.startswith("Request id")
        )
        next(b for b in app.button if b.label == "Send label").click().run(timeout=PAGE_TIMEOUT_S)
        (success,) = texts(app, "success")
        assert f"Label {truth} stored for request {request_id}" in success
    logged = read_predictions(settings.resolved_predlog_url(), request_id=request_id)
    assert list(logged.true_labels) == [int(truth)]


def test_models_page_shows_champion_challenger_and_the_history(
    ui_env: Path, run_page: RunPage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri = make_registry(tmp_path)
    monkeypatch.setenv("OPSLOOP_UI_TRACKING_URI", uri)
    app = run_page("models")
    assert_no_traceback(app)
    assert {m.label: m.value for m in app.metric} == {
        "Champion": "v1",
        "Challenger": "v2",
        "Versions": "2",
    }
    assert texts(app, "subheader") == [
        "Versions",
        "Champion and challenger",
        "Promotion history",
    ]
    frames = app.dataframe
    versions, comparison, *_lineage, history = (frame.value for frame in frames)
    assert list(versions["version"]) == ["v2", "v1"]
    assert list(versions["gate"]) == ["refused", "-"]
    assert comparison.iloc[0]["difference"] == "-0.0600"
    assert list(history["decision"]) == ["refused", "promoted"]
    # Once the challenger holds `champion` too, the comparison is with the champion it replaced.
    rollback_champion(MODEL, "2", "the live watch preferred it", uri, by="test")
    app = run_page("models")
    assert "No challenger waiting: champion v2 against v1, the champion it replaced." in texts(
        app, "caption"
    )
    assert list(app.dataframe[1].value.columns)[1:3] == ["previous champion v1", "champion v2"]


def test_monitoring_page_shows_accuracy_drift_and_the_least_confident(
    ui_env: Path,
    run_page: RunPage,
    monkeypatch: pytest.MonkeyPatch,
    bundle: ExportResult,
    trained: tuple[Path, DataConfig],
    tmp_path: Path,
) -> None:
    from opsloop.corruption import get_corruption

    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    test = load_split(dataset_dir(trained[1]), "test")
    images, labels = test.images[:200], test.labels[:200]
    noisy = get_corruption("gaussian_noise")(images, 3, pixel_max=16.0, rng=0)
    version = bundle.manifest.model_version or "3"
    log_answers(url, bundle.path, images, prefix="c", scratch=tmp_path, labels=labels)
    log_answers(url, bundle.path, noisy, prefix="n", scratch=tmp_path)
    monkeypatch.setenv("OPSLOOP_UI_PREDLOG_URL", url)
    monkeypatch.setenv("OPSLOOP_UI_BUNDLE_PATH", str(bundle.path))
    monkeypatch.setenv("OPSLOOP_UI_DRIFT_WINDOW", "100")
    monitor_settings = load_monitor_settings(interval_seconds=0.2, window=100)
    monitor = DriftMonitor(monitor_settings, bundle.path, url)
    with serving(create_monitor_app(monitor)) as monitor_url:
        monkeypatch.setenv("OPSLOOP_UI_MONITOR_URL", monitor_url)
        deadline = time.monotonic() + 60
        while monitor.latest is None and time.monotonic() < deadline:
            time.sleep(0.1)
        app = run_page("monitoring")
    assert_no_traceback(app)
    assert not app.error, texts(app, "error")
    captions = "\n".join(texts(app, "caption"))
    assert f"Monitoring service at {monitor_url}: DRIFT in" in captions
    assert "The last 400 answers in the prediction log" in captions
    assert "200 with a true label" in captions
    assert "Latest window: DRIFT (" in captions
    (quality,) = (frame.value for frame in app.dataframe)
    row = quality.iloc[0]
    assert (row["version"], row["answers"], row["labelled"]) == (f"v{version}", 400, 200)
    assert row["estimated"].endswith("%")
    charts = app.get("vega_lite_chart")
    assert len(charts) == 2  # accuracy and drift over time
    assert len(app.get("image")) == 12  # the gallery


def test_loop_page_shows_the_runs_as_a_timeline(
    ui_env: Path, run_page: RunPage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    history = History(url)
    run = history.create("accuracy", "online accuracy 0.61 below 0.90", {"labelled": 80}, "x")
    history.update(run, state="succeeded", model_version="2", decision="better", promoted=True)
    history.create("manual", "asked by hand", {}, "dry_run")
    history.dispose()
    monkeypatch.setenv("OPSLOOP_UI_LOOP_DB_URL", url)
    app = run_page("loop")
    assert_no_traceback(app)
    captions = "\n".join(texts(app, "caption"))
    assert "2 loop runs since" in captions
    assert "1 promoted a new champion" in captions
    assert "Promotions and rollbacks from the registry are left out: no model registry" in captions
    timeline, runs = (frame.value for frame in app.dataframe)
    assert list(runs["trigger"]) == ["manual", "accuracy"]
    assert "run 1: gate promoted v2" in list(timeline["what"])


def test_the_entrypoint_lands_on_predict_and_says_where_it_looks(ui_env: Path) -> None:
    app = AppTest.from_file(str(APP_PATH), default_timeout=PAGE_TIMEOUT_S).run()
    assert_no_traceback(app)
    assert texts(app, "title") == ["Predict"]
    assert f"workspace {ui_env.resolve()}" in "\n".join(texts(app.sidebar, "caption"))


def test_a_bad_setting_is_shown_in_one_line(ui_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSLOOP_UI_WINDOW", "0")
    app = AppTest.from_file(str(APP_PATH), default_timeout=PAGE_TIMEOUT_S).run()
    assert_no_traceback(app)
    (error,) = texts(app, "error")
    assert error.startswith("OPSLOOP_UI_WINDOW='0' is invalid")
    assert not app.title
