"""The in-memory form every dataset source produces before it is split and written to disk."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from opsloop.errors import DataError


@dataclass(frozen=True)
class RawDataset:
    """Images as uint8 (N, C, H, W) on the source's own pixel scale, with integer labels.

    `pixel_max` is the top of that scale (16 for scikit-learn's digits, 255 for MNIST): models take
    raw pixels on this scale and normalise inside their graph. `test_images`/`test_labels` hold an
    official test split where the source defines one (MNIST); otherwise the test split is drawn.
    """

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    class_names: list[str]
    source: str
    pixel_max: float
    test_images: npt.NDArray[np.uint8] | None = None
    test_labels: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        check_arrays(self.images, self.labels, len(self.class_names), self.source)
        if (self.test_images is None) != (self.test_labels is None):
            raise DataError(f"{self.source}: test images and labels must be given together")
        if self.test_images is not None and self.test_labels is not None:
            check_arrays(self.test_images, self.test_labels, len(self.class_names), self.source)
            if self.test_images.shape[1:] != self.images.shape[1:]:
                raise DataError(
                    f"{self.source}: test images have shape {self.test_images.shape[1:]} but "
                    f"training images {self.images.shape[1:]}; the splits must share one shape"
                )


def check_arrays(
    images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64], num_classes: int, source: str
) -> None:
    """Reject arrays that break the dataset contract, naming what is wrong."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(
            f"{source}: images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
        )
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"{source}: {labels.shape[0]} labels for {images.shape[0]} images; counts must match"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source}: labels span {labels.min()}..{labels.max()} but there are {num_classes} "
            "class names; fix data.class_names"
        )
