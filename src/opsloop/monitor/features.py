"""Features of a window of predictions that drift tests compare against the reference.

Image statistics of the raw pixels (input drift), a PCA projection of the model's embeddings
(model-based drift) and the softmax outputs with their confidence and entropy (black-box shift
detection). Pure numpy: computed the same way for the reference sample and every live window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from opsloop.bundle import LogBasis
from opsloop.errors import MonitorError

FloatArray = npt.NDArray[np.float64]
MAX_PCA_COMPONENTS = 8
PCA_VARIANCE = 0.9
# Pixel levels, as fractions of pixel_max, that separate background, ink and saturated ink.
BACKGROUND_LEVEL = 0.05
INK_LEVEL = 0.5
SATURATED_LEVEL = 0.95
EDGE_LEVEL = 0.25

IMAGE_FEATURES = (
    "brightness",
    "contrast",
    "dynamic_range",
    "sharpness",
    "gradient",
    "edge_density",
    "ink_fraction",
    "background_fraction",
    "saturated_fraction",
    "centroid_row",
    "centroid_col",
    "spread",
    "orientation",
    "eccentricity",
)


def image_statistics(images: npt.NDArray[Any], pixel_max: float) -> FloatArray:
    """Per-image statistics (N, len(IMAGE_FEATURES)) of raw (N, C, H, W) pixels on their scale.

    Pixels are divided by `pixel_max` first, so the features are comparable across datasets;
    channels are averaged (the statistics describe luminance). Chosen so that each common
    corruption moves at least one of them: noise the background fraction and sharpness, blur the
    sharpness and edges, rotation the orientation and spread, contrast the range and brightness.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise MonitorError(f"images must be a non-empty (N, C, H, W) batch; got {images.shape}")
    gray = images.astype(np.float64).mean(axis=1) / float(pixel_max)  # (N, H, W)
    flat = gray.reshape(len(gray), -1)
    grad_rows, grad_cols = np.gradient(gray, axis=(1, 2))
    gradient = np.hypot(grad_rows, grad_cols).reshape(len(gray), -1)
    centroid_row, centroid_col, spread, orientation, eccentricity = _moments(gray)
    columns = (
        flat.mean(axis=1),
        flat.std(axis=1),
        flat.max(axis=1) - flat.min(axis=1),
        np.abs(_laplacian(gray)).reshape(len(gray), -1).mean(axis=1),
        gradient.mean(axis=1),
        (gradient > EDGE_LEVEL).mean(axis=1),
        (flat > INK_LEVEL).mean(axis=1),
        (flat < BACKGROUND_LEVEL).mean(axis=1),
        (flat > SATURATED_LEVEL).mean(axis=1),
        centroid_row,
        centroid_col,
        spread,
        orientation,
        eccentricity,
    )
    return np.stack(columns, axis=1)


def _laplacian(gray: FloatArray) -> FloatArray:
    """The 4-neighbour Laplacian of each (H, W) image; edges replicated, so borders add nothing."""
    padded = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return (
        padded[:, :-2, 1:-1]
        + padded[:, 2:, 1:-1]
        + padded[:, 1:-1, :-2]
        + padded[:, 1:-1, 2:]
        - 4.0 * gray
    )


def _moments(gray: FloatArray) -> tuple[FloatArray, ...]:
    """Intensity-weighted centroid (as a fraction of the side), spread and principal axis."""
    _, height, width = gray.shape
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    mass = gray.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)  # a blank image gets the centre, not a NaN
    weight_rows = gray.sum(axis=2) / safe[:, None]
    weight_cols = gray.sum(axis=1) / safe[:, None]
    mean_row = np.where(mass > 0, weight_rows @ rows, 0.5)
    mean_col = np.where(mass > 0, weight_cols @ cols, 0.5)
    d_row = rows[None, :, None] - mean_row[:, None, None]
    d_col = cols[None, None, :] - mean_col[:, None, None]
    mu20 = (gray * d_row**2).sum(axis=(1, 2)) / safe
    mu02 = (gray * d_col**2).sum(axis=(1, 2)) / safe
    mu11 = (gray * d_row * d_col).sum(axis=(1, 2)) / safe
    spread = np.sqrt(mu20 + mu02)
    # The principal axis angle moves with rotation; digits are mostly upright, so rotated windows
    # widen its distribution. Eccentricity says how elongated the stroke mass is.
    orientation = np.degrees(0.5 * np.arctan2(2.0 * mu11, mu20 - mu02))
    root = np.sqrt((mu20 - mu02) ** 2 + 4.0 * mu11**2)
    eccentricity = root / np.where(mu20 + mu02 > 0, mu20 + mu02, 1.0)
    return mean_row, mean_col, spread, orientation, eccentricity


def softmax_features(probabilities: npt.NDArray[Any]) -> tuple[FloatArray, list[str]]:
    """Per-class probabilities, the confidence (max probability) and the entropy, as columns."""
    probs = probabilities.astype(np.float64)
    confidence = probs.max(axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    names = [f"p_class_{k}" for k in range(probs.shape[1])] + ["confidence", "entropy"]
    return np.column_stack([probs, confidence, entropy]), names


@dataclass(frozen=True)
class Projection:
    """The reference embeddings' leading principal components that the drift tests compare.

    Built from the bundle's `LogBasis` (the basis the prediction log stores embeddings in), so
    `transform` takes either whole embeddings (N, D) or logged coordinates (N, basis width).
    """

    mean: FloatArray
    components: FloatArray  # (k, D)
    explained: FloatArray  # variance share of each kept component
    logged_width: int = 0  # the width of logged coordinates (0: the log keeps whole embeddings)

    @classmethod
    def from_basis(cls, basis: LogBasis) -> Projection:
        """Keep the leading components up to `PCA_VARIANCE` of the variance, at most a few.

        Few components keep the multiple-testing family small (power) while still covering
        most of what the embedding varies in.
        """
        keep = int(np.searchsorted(np.cumsum(basis.variance), PCA_VARIANCE) + 1)
        keep = max(1, min(keep, MAX_PCA_COMPONENTS, basis.width))
        return cls(
            mean=basis.mean.astype(np.float64),
            components=basis.components[:keep].astype(np.float64),
            explained=basis.variance[:keep],
            logged_width=basis.width,
        )

    @classmethod
    def fit(cls, embeddings: npt.NDArray[Any]) -> Projection:
        """From the reference embeddings themselves (a bundle exported without a log basis)."""
        basis = LogBasis.fit(embeddings)
        if basis is None:  # already narrow: every dimension is a component
            width = embeddings.shape[1]
            return cls(
                mean=embeddings.astype(np.float64).mean(axis=0),
                components=np.eye(width),
                explained=np.full(width, 1.0 / width),
            )
        return dataclasses.replace(cls.from_basis(basis), logged_width=0)

    def transform(self, embeddings: npt.NDArray[Any]) -> FloatArray:
        """Embeddings (N, D), or their logged coordinates (N, basis width), as (N, k)."""
        width = embeddings.shape[1] if embeddings.ndim == 2 else 0
        if self.logged_width and width == self.logged_width != len(self.mean):
            return np.asarray(embeddings[:, : len(self.components)], dtype=np.float64)
        return np.asarray((embeddings.astype(np.float64) - self.mean) @ self.components.T)

    def accepts(self, width: int) -> bool:
        """Whether `transform` takes embeddings of this width."""
        return width in (len(self.mean), self.logged_width)

    @property
    def names(self) -> list[str]:
        return [f"pc{i + 1}" for i in range(len(self.components))]
