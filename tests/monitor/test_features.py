"""Image statistics move with the corruptions they are meant to see."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opsloop.monitor.features import IMAGE_FEATURES, image_statistics
from tests.monitor.samples import draw, shifted

if TYPE_CHECKING:
    pass


def test_image_statistics_see_blur_and_noise(holdout_split: Any) -> None:
    images = draw(holdout_split[0], 100, seed=0)
    base = image_statistics(images, 16.0).mean(axis=0)
    blurred = image_statistics(shifted(images, "gaussian_blur", 1 / 8), 16.0).mean(axis=0)
    noisy = image_statistics(shifted(images, "gaussian_noise", 2 / 16), 16.0).mean(axis=0)
    sharpness, background = (
        IMAGE_FEATURES.index("sharpness"),
        IMAGE_FEATURES.index("background_fraction"),
    )
    assert blurred[sharpness] < 0.8 * base[sharpness]
    assert noisy[background] < 0.8 * base[background]
