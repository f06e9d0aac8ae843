"""The traffic simulator's plan checks, image choice and request order (no server needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from opsloop.bundle import load_bundle
from opsloop.config import DataConfig
from opsloop.data import dataset_dir
from opsloop.errors import ConfigError
from opsloop.monitor.simulate import (
    TrafficError,
    TrafficPlan,
    build_batches,
    check_target,
    held_out_images,
    infer_body,
    simulate_traffic,
)
from tests.integration.processes import free_port

if TYPE_CHECKING:
    from opsloop.export import ExportResult


def plan(**changes: object) -> TrafficPlan:
    values: dict[str, object] = {
        "url": "http://127.0.0.1:8000",
        "model_name": "digits",
        "clean": 3,
        "corrupted": 2,
        "rate": 100.0,
    }
    return TrafficPlan(**(values | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:8000", "https://127.0.0.2"],
)
def test_loopback_targets_are_accepted(url: str) -> None:
    assert check_target(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:80"])
def test_remote_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ConfigError, match=r"not on this machine.*--allow-remote"):
        check_target(url)
    assert check_target(url, allow_remote=True) == url


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clean": 0, "corrupted": 0}, "not both 0"),
        ({"clean": -1}, "non-negative"),
        ({"rate": 0.0}, "--rate 0.0 must lie in"),
        ({"batch": 0}, "--batch 0"),
        ({"max_seconds": 0.0}, "--max-seconds"),
        ({"corruption": "sepia"}, "unknown corruption 'sepia'; use one of: gaussian_noise"),
        ({"severity": 4}, "severity 4 .* out of range"),
        ({"url": "ftp://127.0.0.1"}, "must be an http"),
    ],
)
def test_bad_plans_are_refused_with_the_fix(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(**changes).check()


def test_clean_batches_come_first_and_only_corrupted_ones_change() -> None:
    images = np.repeat(np.arange(10, dtype=np.uint8), 64).reshape(10, 1, 8, 8)  # 10 distinct
    batches = build_batches(images, plan(clean=6, corrupted=2, batch=2), pixel_max=16)
    assert [phase for phase, _ in batches] == ["clean"] * 6 + ["corrupted"] * 2
    assert all(batch.shape == (2, 1, 8, 8) for _, batch in batches)
    clean = np.concatenate([batch for phase, batch in batches if phase == "clean"])
    originals = {image.tobytes() for image in images}
    assert all(image.tobytes() in originals for image in clean)  # replayed as they are
    assert len({image.tobytes() for image in clean[:10]}) == 10  # no repeat within a pass
    corrupted = np.concatenate([batch for phase, batch in batches if phase == "corrupted"])
    assert not any(image.tobytes() in originals for image in corrupted)
    again = build_batches(images, plan(clean=6, corrupted=2, batch=2), pixel_max=16)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(batches, again, strict=True))


def test_the_request_body_is_an_open_inference_protocol_request() -> None:
    import orjson

    body = orjson.loads(infer_body(np.ones((2, 1, 8, 8), np.uint8), "r1", "pixels"))
    assert body["id"] == "r1"
    assert body["inputs"][0]["shape"] == [2, 1, 8, 8]
    assert body["inputs"][0]["datatype"] == "FP32"
    assert len(body["inputs"][0]["data"]) == 128


def test_images_come_from_the_test_split_else_the_bundle_reference(
    bundle: ExportResult, trained: tuple[Path, DataConfig], tmp_path: Path
) -> None:
    loaded = load_bundle(bundle.path)
    images, source = held_out_images(loaded, dataset_dir(trained[1]))
    assert source.startswith("test split of")
    assert images.shape[1:] == (1, 8, 8)
    fallback, source = held_out_images(loaded, tmp_path / "no-dataset")
    assert source.startswith("reference sample of")
    np.testing.assert_array_equal(fallback, loaded.load_reference()["images"])


def test_a_server_that_is_not_running_is_a_clear_error() -> None:
    target = plan(url=f"http://127.0.0.1:{free_port()}", clean=1, corrupted=0)
    images = np.zeros((4, 1, 8, 8), np.uint8)
    with pytest.raises(TrafficError, match=r"cannot reach .*start `opsloop serve`"):
        simulate_traffic(target, images, pixel_max=16, input_name="pixels")
