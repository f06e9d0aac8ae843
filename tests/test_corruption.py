"""Corruptions: shape, dtype and range kept; seeded; stronger with severity; bad input named."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

from opsloop.corruption import CORRUPTIONS, SEVERITIES, corrupt, get_corruption, translate
from opsloop.errors import ConfigError, DataError

NAMES = sorted(CORRUPTIONS)
RANDOM_NAMES = sorted(name for name, c in CORRUPTIONS.items() if c.random)


@pytest.fixture(scope="module")
def digits() -> npt.NDArray[np.uint8]:
    """200 real 8x8 digits on their 0-16 scale: structure that blur and rotation can change."""
    return load_digits().images[:200, None].astype(np.uint8)


@pytest.fixture(scope="module")
def large_float(digits: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The same digits as 24x24 float32 images on a 0-255 scale."""
    return (np.kron(digits, np.ones((1, 1, 3, 3))) * 255.0 / 16.0).astype(np.float32)


def mean_change(before: npt.NDArray[np.generic], after: npt.NDArray[np.generic]) -> float:
    return float(np.abs(after.astype(np.float64) - before.astype(np.float64)).mean())


def test_the_registry_names_match_and_cover_the_brief() -> None:
    assert all(corruption.name == name for name, corruption in CORRUPTIONS.items())
    expected = {"gaussian_noise", "gaussian_blur", "rotation", "contrast", "occlusion"}
    assert expected <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_uint8_shape_dtype_and_range_kept(
    digits: npt.NDArray[np.uint8], name: str, severity: int
) -> None:
    out = corrupt(digits, name, severity, pixel_max=16, rng=0)
    assert out.shape == digits.shape
    assert out.dtype == np.uint8
    assert out.min() >= 0
    assert out.max() <= 16
    assert mean_change(digits, out) > 0


@pytest.mark.parametrize("name", NAMES)
def test_float_shape_dtype_and_range_kept(large_float: npt.NDArray[np.float32], name: str) -> None:
    out = corrupt(large_float, name, 3, pixel_max=255, rng=1)
    assert out.shape == large_float.shape
    assert out.dtype == np.float32
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 255.0


@pytest.mark.parametrize("name", NAMES)
def test_input_is_not_modified(digits: npt.NDArray[np.uint8], name: str) -> None:
    before = digits.copy()
    corrupt(digits, name, 3, pixel_max=16, rng=0)
    np.testing.assert_array_equal(digits, before)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed_and_a_generator(digits: npt.NDArray[np.uint8], name: str) -> None:
    first = corrupt(digits, name, 2, pixel_max=16, rng=7)
    again = corrupt(digits, name, 2, pixel_max=16, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_random_corruptions_differ_across_seeds(digits: npt.NDArray[np.uint8], name: str) -> None:
    one = corrupt(digits, name, 2, pixel_max=16, rng=1)
    two = corrupt(digits, name, 2, pixel_max=16, rng=2)
    assert not np.array_equal(one, two)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fixture", ["digits", "large_float"])
def test_severity_increases_the_change(
    name: str, fixture: str, request: pytest.FixtureRequest
) -> None:
    images = request.getfixturevalue(fixture)
    pixel_max = 16 if images.dtype == np.uint8 else 255
    changes = [
        mean_change(images, corrupt(images, name, s, pixel_max=pixel_max, rng=0))
        for s in SEVERITIES
    ]
    assert changes[0] < changes[1] < changes[2], changes


def test_contrast_pulls_towards_mid_grey() -> None:
    images = np.array([0.0, 8.0, 16.0]).reshape(1, 1, 1, 3)
    out = corrupt(images, "contrast", 1, pixel_max=16, rng=0)
    np.testing.assert_allclose(out.ravel(), [3.2, 8.0, 12.8])  # keeps 0.6 of the distance to 8


def test_occlusion_zeroes_one_square_patch_per_image() -> None:
    images = np.full((5, 1, 8, 8), 10, dtype=np.uint8)
    out = corrupt(images, "occlusion", 3, pixel_max=16, rng=0)
    zeroed = (out == 0).reshape(5, -1).sum(axis=1)
    assert zeroed.tolist() == [16] * 5  # a 4x4 patch: half of the 8-pixel side
    assert set(np.unique(out)) == {0, 10}


def test_salt_and_pepper_sets_only_extremes() -> None:
    images = np.full((20, 1, 10, 10), 100, dtype=np.uint8)
    out = corrupt(images, "salt_and_pepper", 3, pixel_max=255, rng=0)
    assert set(np.unique(out)) == {0, 100, 255}
    assert (out != 100).mean() == pytest.approx(0.2, abs=0.03)


def test_gaussian_noise_has_the_documented_spread() -> None:
    images = np.full((50, 1, 20, 20), 128.0)
    out = corrupt(images, "gaussian_noise", 1, pixel_max=255, rng=0)
    assert float(np.std(out - images)) == pytest.approx(0.1 * 255, rel=0.05)


def test_translate_moves_pixels_and_fills_with_zero() -> None:
    image = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    moved = translate(image, 1, -2)
    np.testing.assert_array_equal(moved[0, 1:, :2], image[0, :3, 2:])
    assert moved[0, 0].sum() == 0
    assert moved[0, :, 2:].sum() == 0
    assert translate(image, 4, 0).sum() == 0


def test_unknown_name_lists_the_valid_ones(digits: npt.NDArray[np.uint8]) -> None:
    with pytest.raises(ConfigError, match=r"unknown corruption 'fog'.*gaussian_noise.*rotation"):
        corrupt(digits, "fog", 1, pixel_max=16, rng=0)
    with pytest.raises(ConfigError, match="use one of"):
        get_corruption("")


@pytest.mark.parametrize("severity", [0, 4, -1, True])
def test_severity_out_of_range(digits: npt.NDArray[np.uint8], severity: int) -> None:
    with pytest.raises(ConfigError, match=r"severity .* out of range; use one of: 1, 2, 3"):
        corrupt(digits, "rotation", severity, pixel_max=16, rng=0)


def test_bad_images_and_scale_are_named(digits: npt.NDArray[np.uint8]) -> None:
    with pytest.raises(DataError, match=r"\(N, C, H, W\); got shape \(200, 8, 8\)"):
        corrupt(digits[:, 0], "contrast", 1, pixel_max=16, rng=0)
    with pytest.raises(DataError, match="dtype bool"):
        corrupt(digits.astype(bool), "contrast", 1, pixel_max=16, rng=0)
    with pytest.raises(ConfigError, match="pixel_max=0"):
        corrupt(digits, "contrast", 1, pixel_max=0, rng=0)
