"""The app in a real browser: Debian's chromium, driven by Selenium, against real processes.

A workspace gets what `make run` makes (`opsloop pipeline`: a champion v1 and its bundle), then
`opsloop serve` and `opsloop monitor serve` start on 127.0.0.1; labelled traffic goes through, half
of it rotated; `opsloop loop run --once` retrains on it and promotes v2, which the server swaps
to; more labelled traffic follows. `opsloop ui` then serves the app and the browser uploads a
digit, draws one, sends a label, and opens every page. Every process is stopped by PID.

The pages are saved as screenshots: into a temporary directory, or into the directory named by
`OPSLOOP_UI_SCREENSHOTS` (`make ui-screenshots` points it at docs/images, which the docs show).
Skipped, with the reason, only where chromium or chromedriver is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from opsloop.corruption import get_corruption
from opsloop.data import load_split
from opsloop.predictions import read_predictions
from tests.integration.processes import OPSLOOP, Process, free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "digits-cnn"
SCREENSHOTS_ENV = "OPSLOOP_UI_SCREENSHOTS"
WAIT_S = 120  # a page's first run imports MLflow or scipy on a busy 2-core machine
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def browser_binaries() -> tuple[str, str] | None:
    chromium = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return None if chromium is None or driver is None else (chromium, driver)


@dataclass
class Stack:
    workspace: Path
    server: str
    app: str
    log_url: str
    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]


def send_labelled(
    server: str, images: npt.NDArray[Any], labels: npt.NDArray[Any], tag: str
) -> None:
    """V2 infer calls with our own ids, then each true label to /feedback, as a client would."""
    with httpx.Client(base_url=server, timeout=30, trust_env=False) as client:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            request_id = f"{tag}-{index}"
            tensor = {
                "name": "pixels",
                "shape": [1, *image.shape],
                "datatype": "FP32",
                "data": image.astype(np.float32).ravel().tolist(),
            }
            answer = client.post(
                f"/v2/models/{MODEL}/infer", json={"id": request_id, "inputs": [tensor]}
            )
            assert answer.status_code == 200, answer.text
            stored = client.post("/feedback", json={"request_id": request_id, "label": int(label)})
            assert stored.status_code == 200, stored.text


def served_version(server: str) -> str | None:
    try:
        response = httpx.get(f"{server}/v2/models/{MODEL}", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    return str(response.json()["versions"][0]) if response.status_code == 200 else None


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached after {timeout:.0f}s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server, monitor and app over a workspace whose loop has already promoted v2."""
    if browser_binaries() is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver)")  # fmt: skip
    workspace = tmp_path_factory.mktemp("ui")
    processed = workspace / "data" / "processed"
    log_url = f"sqlite:///{workspace / 'predictions.db'}"
    env = {"OPSLOOP_WORKSPACE": str(workspace), "OPSLOOP_PREDLOG_URL": log_url}
    pipeline = Process(
        [*OPSLOOP, "pipeline", f"workspace={workspace}", f"data.processed_dir={processed}"],
        workspace / "pipeline.log",
        {**os.environ, **env},
    )
    pipeline.start()
    assert pipeline.process is not None
    assert pipeline.process.wait(timeout=600) == 0, pipeline.log()
    test = load_split(processed / "digits", "test")
    order = np.random.default_rng(0).permutation(len(test.labels))
    images, labels = test.images[order[:300]], test.labels[order[:300]]
    rotated = get_corruption("rotation")(images, 3, pixel_max=16.0, rng=1)
    serve_port, monitor_port, app_port = free_port(), free_port(), free_port()
    server = f"http://127.0.0.1:{serve_port}"
    serve_env = env | {
        "OPSLOOP_PORT": str(serve_port),
        "OPSLOOP_RELOAD_POLL_SECONDS": "1",
        "OPSLOOP_PREDLOG_FLUSH_MS": "50",
    }
    monitor_env = env | {
        "OPSLOOP_MONITOR_PORT": str(monitor_port),
        "OPSLOOP_MONITOR_BUNDLE_PATH": str(workspace / "bundles" / MODEL),
        "OPSLOOP_MONITOR_PREDLOG_URL": log_url,
        "OPSLOOP_MONITOR_INTERVAL_SECONDS": "2",
    }
    loop_env = env | {
        "OPSLOOP_LOOP_WORKSPACE": str(workspace),
        "OPSLOOP_LOOP_OVERRIDES": f"data.processed_dir={processed}",
    }
    app_env = {
        "OPSLOOP_UI_WORKSPACE": str(workspace),
        "OPSLOOP_UI_MONITOR_URL": f"http://127.0.0.1:{monitor_port}",
    }
    app_command = [*OPSLOOP, "ui", "--port", str(app_port), "--server", server]
    with (
        running([*OPSLOOP, "serve"], workspace / "serve.log", serve_env) as serving,
        running([*OPSLOOP, "monitor", "serve"], workspace / "monitor.log", monitor_env),
    ):
        serving.wait_for_http(f"{server}/v2/health/ready")
        send_labelled(server, images, labels, "clean")
        send_labelled(server, rotated, labels, "rotated")
        reason = ["--reason", "the tour: retrain on the labelled production traffic"]
        loop = Process(
            [*OPSLOOP, "loop", "run", "--once", *reason],
            workspace / "loop.log",
            {**os.environ, **loop_env},
        )
        loop.start()
        assert loop.process is not None
        assert loop.process.wait(timeout=600) == 0, loop.log()
        wait_for(lambda: served_version(server) == "2", "the server swapping to v2")
        send_labelled(server, rotated[:200], labels[:200], "after")
        with running(app_command, workspace / "ui.log", app_env) as app:
            app.wait_for_http(f"http://127.0.0.1:{app_port}/_stcore/health")
            yield Stack(workspace, server, f"http://127.0.0.1:{app_port}", log_url, images, labels)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: `$OPSLOOP_UI_SCREENSHOTS` (e.g. docs/images), else a temporary dir."""
    chosen = os.environ.get(SCREENSHOTS_ENV)
    directory = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    """Headless chromium through chromedriver; quit at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binaries = browser_binaries()
    assert binaries is not None  # `stack` skipped otherwise
    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(binaries[1]), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def settled(driver: Any, ready: Callable[[], bool], what: str) -> None:
    """Until `ready()` holds and Streamlit has finished running the page's script."""
    from selenium.common.exceptions import WebDriverException

    def done() -> bool:
        try:
            idle = css(driver, '[data-testid="stApp"][data-test-script-state="notRunning"]')
            return bool(idle) and ready()
        except WebDriverException:  # the element went away while we looked: look again
            return False

    wait_for(done, what)
    time.sleep(1.0)  # charts and tables draw after the script's last message


def open_page(driver: Any, url: str, title: str) -> None:
    driver.get(url)
    settled(driver, lambda: title in [h.text for h in css(driver, "h1")], f"the {title} page")


def page_text(driver: Any) -> str:
    return str(driver.find_element("css selector", '[data-testid="stMain"]').text)


def screenshot(driver: Any, directory: Path, name: str) -> Path:
    """The whole page: the window grows to the content's height first (Streamlit scrolls inside
    its main block, not the window)."""
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=\"stMain\"]');"
        "return m ? m.scrollHeight : document.body.scrollHeight;"
    )
    driver.set_window_size(1400, min(max(int(height) + 40, 800), 4000))
    time.sleep(1.0)
    path = directory / f"ui-{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    assert path.stat().st_size > 10_000  # a real rendering, not an empty page
    return path


def digit_png(image: npt.NDArray[Any], path: Path) -> Path:
    """A held-out 8x8 digit as a 64x64 PNG, white ink on black like the dataset."""
    grey = np.clip(image[0] * (255.0 / 16.0), 0, 255).astype(np.uint8)
    Image.fromarray(grey).resize((64, 64), Image.Resampling.NEAREST).save(path)
    return path


def pick_clear_digit(stack: Stack, directory: Path) -> tuple[Path, int]:
    """An image the served model gets right through /predict, and its label."""
    for index in range(len(stack.labels)):
        path = digit_png(stack.images[index], directory / f"digit-{index}.png")
        answer = httpx.post(
            f"{stack.server}/predict",
            files={"file": (path.name, path.read_bytes())},
            timeout=30,
            trust_env=False,
        ).json()
        if answer["label"] == int(stack.labels[index]) and answer["confidence"] > 0.9:
            return path, int(stack.labels[index])
    raise AssertionError("the served model gets no held-out digit right with confidence")


def click_tab(driver: Any, label: str) -> None:
    tab = next(t for t in css(driver, '[role="tab"]') if t.text.strip() == label)
    tab.click()


def answer_metric(driver: Any) -> str | None:
    values = css(driver, '[data-testid="stMetricValue"]')
    return str(values[0].text).strip() if values else None


def test_upload_a_digit_see_the_answer_and_send_its_label(
    stack: Stack, browser: Any, shots: Path, tmp_path: Path
) -> None:
    path, label = pick_clear_digit(stack, tmp_path)
    open_page(browser, stack.app, "Predict")
    assert "Serving digits-cnn version 2." in page_text(browser)
    click_tab(browser, "Upload")
    upload = css(browser, '[data-testid="stFileUploader"] input[type="file"]')[0]
    upload.send_keys(str(path))
    settled(browser, lambda: answer_metric(browser) is not None, "the answer to the upload")
    assert answer_metric(browser) == str(label)
    text = page_text(browser)
    assert "Model digits-cnn version 2 (champion)" in text
    assert "via /predict" in text
    found = re.search(r"Request id (\S+)", text)
    assert found is not None, text
    request_id = found.group(1)
    send = next(b for b in css(browser, "button") if b.text.strip() == "Send label")
    send.click()
    settled(
        browser,
        lambda: f"stored for request {request_id}" in page_text(browser),
        "the label's confirmation",
    )
    screenshot(browser, shots, "predict")
    logged = read_predictions(stack.log_url, request_id=request_id)
    assert list(logged.labels) == [label]
    assert list(logged.true_labels) == [label]  # the label joined its prediction in the log
    assert logged.model_versions == ["2"]


def test_draw_a_digit_on_the_pad(stack: Stack, browser: Any, shots: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, stack.app, "Predict")
    click_tab(browser, "Draw")
    pad = css(browser, "canvas.opsloop-sketch-pad")[0]
    strokes = ActionChains(browser)
    strokes.move_to_element_with_offset(pad, 0, -90).click_and_hold()
    for _ in range(9):
        strokes.move_by_offset(0, 20)
    strokes.release().perform()
    before = len(read_predictions(stack.log_url))
    css(browser, "button.opsloop-sketch-send")[0].click()
    settled(browser, lambda: "drawing" in page_text(browser), "the answer to the drawing")
    assert answer_metric(browser) in [str(i) for i in range(10)]
    assert "Model digits-cnn version 2 (champion)" in page_text(browser)
    assert "via /predict" in page_text(browser)
    screenshot(browser, shots, "draw")
    wait_for(lambda: len(read_predictions(stack.log_url)) > before, "the drawing in the log")


def test_models_lists_the_champion_and_the_gate_decisions(
    stack: Stack, browser: Any, shots: Path
) -> None:
    open_page(browser, f"{stack.app}/models", "Models")
    settled(browser, lambda: len(css(browser, '[data-testid="stMetric"]')) == 3, "the summary")
    metrics = dict(
        tuple(metric.text.strip().split("\n")[:2])
        for metric in css(browser, '[data-testid="stMetric"]')
    )
    assert metrics["Champion"] == "v2"
    assert metrics["Versions"] == "2"
    text = page_text(browser)
    assert "Promotion history" in text
    assert "Lineage of v2" in text
    assert len(css(browser, '[data-testid="stDataFrame"]')) >= 3
    screenshot(browser, shots, "models")


def test_monitoring_shows_accuracy_drift_and_recent_answers(
    stack: Stack, browser: Any, shots: Path
) -> None:
    open_page(browser, f"{stack.app}/monitoring", "Monitoring")
    settled(
        browser,
        lambda: len(css(browser, '[data-testid="stVegaLiteChart"]')) == 2,
        "the accuracy and drift charts",
    )
    text = page_text(browser)
    assert "Drift over time" in text
    assert "Latest window: DRIFT" in text  # v2 still sees rotated digits, unlike its reference
    assert "Monitoring service at http://127.0.0.1:" in text
    assert len(css(browser, '[data-testid="stImage"]')) == 12
    screenshot(browser, shots, "monitoring")


def test_loop_shows_the_run_that_promoted_v2(stack: Stack, browser: Any, shots: Path) -> None:
    open_page(browser, f"{stack.app}/loop", "Loop")
    settled(
        browser,
        lambda: len(css(browser, '[data-testid="stVegaLiteChart"]')) == 1,
        "the timeline",
    )
    text = page_text(browser)
    assert "1 loop runs since" in text
    assert "1 promoted a new champion" in text
    screenshot(browser, shots, "loop")


def test_the_app_survives_the_server_going_away(stack: Stack, browser: Any) -> None:
    """With the server unreachable the Predict page is one line, not a traceback."""
    unreachable = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    env = {"OPSLOOP_UI_WORKSPACE": str(stack.workspace), "OPSLOOP_UI_MONITOR_URL": "none"}
    command = [*OPSLOOP, "ui", "--port", str(port), "--server", unreachable]
    with running(command, stack.workspace / "ui-down.log", env) as app:
        app.wait_for_http(f"http://127.0.0.1:{port}/_stcore/health")
        open_page(browser, f"http://127.0.0.1:{port}", "Predict")
        settled(browser, lambda: bool(css(browser, '[data-testid="stAlert"]')), "the warning")
        alerts = [a.text for a in css(browser, '[data-testid="stAlert"]')]
        assert any(f"The inference server at {unreachable} is not answering" in a for a in alerts)
        assert not css(browser, '[data-testid="stException"]')
        # The other pages still show the workspace's data.
        open_page(browser, f"http://127.0.0.1:{port}/models", "Models")
        assert "v2" in page_text(browser)
