"""Seeded image corruptions at three severities, for robustness evaluation and drift tests.

`corrupt(images, "gaussian_noise", 2, pixel_max=16, rng=0)` returns a corrupted copy of uint8 or
float images shaped (N, C, H, W) on the pixel scale [0, pixel_max], clipped to it and in the input's
dtype. numpy and scipy only (no torch), so the monitoring service and benchmarks can reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from opsloop.errors import ConfigError, DataError

FloatImages = npt.NDArray[np.float64]
SEVERITIES = (1, 2, 3)


@dataclass(frozen=True)
class Corruption:
    """One corruption: a pure float64 transform and its parameter at severities 1, 2 and 3.

    `transform(images, level, pixel_max, rng)` receives float64 (N, C, H, W) images and the
    severity's `level`; calling the corruption handles validation, clipping and the dtype.
    """

    name: str
    transform: Callable[[FloatImages, float, float, np.random.Generator], FloatImages]
    levels: tuple[float, float, float]
    parameter: str  # what `level` means, for the documentation and reports
    random: bool  # whether the result depends on the generator

    def __call__(
        self,
        images: npt.NDArray[np.generic],
        severity: int,
        *,
        pixel_max: float,
        rng: np.random.Generator | int,
    ) -> npt.NDArray[np.generic]:
        check_images(images, pixel_max)
        level = self.level(severity)
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        changed = self.transform(images.astype(np.float64), level, float(pixel_max), generator)
        return to_dtype(np.clip(changed, 0.0, pixel_max), images.dtype)

    def level(self, severity: int) -> float:
        """The parameter value at `severity` (1 = mild, 3 = strong)."""
        if isinstance(severity, bool) or severity not in SEVERITIES:
            raise ConfigError(
                f"severity {severity!r} for corruption '{self.name}' is out of range; "
                f"use one of: {', '.join(map(str, SEVERITIES))}"
            )
        return self.levels[severity - 1]


def check_images(images: npt.NDArray[np.generic], pixel_max: float) -> None:
    """Reject input that is not a batch of (N, C, H, W) numeric images on a positive scale."""
    if images.ndim != 4:
        raise DataError(f"images must be shaped (N, C, H, W); got shape {images.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"images must be integer or float pixels; got dtype {images.dtype}")
    if not pixel_max > 0:
        raise ConfigError(f"pixel_max={pixel_max} must be positive (16 for digits, 255 for MNIST)")


def to_dtype(images: FloatImages, dtype: np.dtype[np.generic]) -> npt.NDArray[np.generic]:
    """Cast back to the input's dtype, rounding first for integer pixels (not truncating)."""
    if np.issubdtype(dtype, np.integer):
        return np.rint(images).astype(dtype)
    return images.astype(dtype)


def image_side(images: FloatImages) -> int:
    """The shorter spatial side, which size-relative parameters scale with."""
    return int(min(images.shape[2], images.shape[3]))


def gaussian_noise(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Add i.i.d. normal noise with standard deviation `level * pixel_max`."""
    return images + rng.normal(0.0, level * pixel_max, size=images.shape)


def salt_and_pepper(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Set a `level` fraction of pixels to 0 or `pixel_max`, half each on average."""
    out = images.copy()
    hit = rng.random(images.shape) < level
    salt = rng.random(images.shape) < 0.5
    out[hit & salt] = pixel_max
    out[hit & ~salt] = 0.0
    return out


def gaussian_blur(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Gaussian blur with sigma `level * image side` pixels, within each channel (deterministic)."""
    sigma = level * image_side(images)
    return np.asarray(ndimage.gaussian_filter(images, sigma=(0.0, 0.0, sigma, sigma)))


def rotation(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Rotate each image by `level` degrees in a random direction (bilinear interpolation).

    Corners that rotate in from outside are 0, the background of digit-like images.
    """
    out = np.empty_like(images)
    positive = rng.random((images.shape[0],)) < 0.5
    for mask, angle in ((positive, level), (~positive, -level)):
        if mask.any():  # one call per direction keeps it vectorised over the batch
            out[mask] = ndimage.rotate(
                images[mask], angle, axes=(2, 3), reshape=False, order=1, mode="constant"
            )
    return out


def contrast(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Pull every pixel towards mid-grey, keeping a `level` fraction of its distance from it."""
    mid = pixel_max / 2.0
    return mid + level * (images - mid)


def occlusion(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Set one square patch per image, of side `level * image side`, to 0 at a random place."""
    n, _, height, width = images.shape
    side = max(1, round(level * image_side(images)))
    top = rng.integers(0, height - side + 1, size=n)
    left = rng.integers(0, width - side + 1, size=n)
    rows, cols = np.arange(height), np.arange(width)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    patch = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    out = images.copy()
    out[np.broadcast_to(patch[:, None], images.shape)] = 0.0
    return out


def shift(
    images: FloatImages, level: float, pixel_max: float, rng: np.random.Generator
) -> FloatImages:
    """Translate each image by `level * image side` pixels in a random direction; fill with 0."""
    distance = max(1, round(level * image_side(images)))
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(images.shape[0],))
    out = np.zeros_like(images)
    for index, angle in enumerate(angles):
        dy, dx = round(distance * math.sin(float(angle))), round(distance * math.cos(float(angle)))
        out[index] = translate(images[index], dy, dx)
    return out


def translate(image: FloatImages, dy: int, dx: int) -> FloatImages:
    """Move a (C, H, W) image by whole pixels; what moves in from outside is 0."""
    out = np.zeros_like(image)
    height, width = image.shape[1:]
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


CORRUPTIONS: dict[str, Corruption] = {
    corruption.name: corruption
    for corruption in (
        Corruption(
            "gaussian_noise", gaussian_noise, (0.1, 0.2, 0.4), "noise std / pixel_max", True
        ),
        Corruption(
            "salt_and_pepper", salt_and_pepper, (0.05, 0.1, 0.2), "fraction of pixels", True
        ),
        Corruption("gaussian_blur", gaussian_blur, (0.05, 0.1, 0.15), "sigma / image side", False),
        Corruption("rotation", rotation, (15.0, 30.0, 45.0), "degrees (random direction)", True),
        Corruption("contrast", contrast, (0.6, 0.4, 0.2), "contrast kept", False),
        Corruption("occlusion", occlusion, (0.25, 0.375, 0.5), "patch side / image side", True),
        Corruption("shift", shift, (0.125, 0.25, 0.375), "shift / image side", True),
    )
}


def get_corruption(name: str) -> Corruption:
    """The corruption called `name`; a `ConfigError` listing the valid names otherwise."""
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown corruption '{name}'; use one of: {', '.join(CORRUPTIONS)}"
        ) from None


def corrupt(
    images: npt.NDArray[np.generic],
    name: str,
    severity: int,
    *,
    pixel_max: float,
    rng: np.random.Generator | int,
) -> npt.NDArray[np.generic]:
    """A corrupted copy of (N, C, H, W) `images`: same shape and dtype, clipped to [0, pixel_max].

    Args:
        images: uint8 or float pixels on the scale [0, pixel_max].
        name: a key of `CORRUPTIONS`.
        severity: 1 (mild), 2 or 3 (strong).
        pixel_max: the top of the pixel scale (16 for digits, 255 for MNIST).
        rng: a generator, or a seed for one; the same seed gives the same result.
    """
    return get_corruption(name)(images, severity, pixel_max=pixel_max, rng=rng)
