"""Label-free accuracy: an estimate of how right the model is on a window no label has reached yet.

The method is a meta-regression on window statistics (as in AutoEval, Deng & Zheng, CVPR 2021):
at export time the bundle's own model is run on many synthetic windows of its validation split —
clean, and shifted by every corruption in `opsloop.corruption` at a grid of strengths, whole or
mixed with clean examples — and a small gradient-boosted tree ensemble learns the window's
accuracy from six statistics of it. At run time the monitor computes the same statistics on a
window of logged predictions and reads the estimate off the trees (numpy only, no sklearn).

Why not the textbook label-free estimators: they read the model's own confidence (average
confidence, CBPE's calibrated confidence, ATC's thresholded confidence), and this model is
overconfident exactly under the shifts that hurt it (a halved contrast leaves it ~90% confident at
~20% accuracy). The statistics here add what the inputs and embeddings say about the shift itself.
What it cannot know: a shift unlike every synthetic one it was fitted on; the benchmark
(`benchmarks/estimate.py`) measures both cases and docs/ground-truth.md reports them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from opsloop.bundle import LOG_BASIS_ARRAYS, LogBasis
from opsloop.errors import MonitorError
from opsloop.monitor.features import image_statistics

logger = logging.getLogger(__name__)

ESTIMATOR_FILE = "estimator.npz"
METHOD = "shift-regression"
FEATURES = (
    "mean_confidence",  # what every confidence-based estimator starts from
    "atc_share",  # share of examples above the ATC threshold (fitted on clean validation data)
    "class_shift",  # total variation between predicted-class frequencies and the reference's
    "embedding_shift",  # RMS of the embedding mean's shift, in reference standard deviations
    "embedding_spread",  # the embedding's spread relative to the reference's
    "input_shift",  # mean absolute shift of the image statistics' means, in reference stds
)
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ReferenceStats:
    """The reference sample's statistics that window features are measured against."""

    pixel_max: float
    atc_threshold: float
    class_frequencies: FloatArray
    embedding_mean: FloatArray
    embedding_std: FloatArray
    input_mean: FloatArray
    input_std: FloatArray

    @classmethod
    def fit(
        cls,
        images: npt.NDArray[Any],
        probabilities: npt.NDArray[Any],
        embeddings: npt.NDArray[Any],
        labels: npt.NDArray[Any],
        pixel_max: float,
    ) -> ReferenceStats:
        """From labelled clean data: the ATC threshold makes the share of examples above it
        equal the accuracy (Garg et al., ICLR 2022)."""
        confidence = np.sort(probabilities.max(axis=1))
        accuracy = float((probabilities.argmax(axis=1) == labels).mean())
        cut = min(len(confidence) - 1, round((1.0 - accuracy) * len(confidence)))
        inputs = image_statistics(images, pixel_max)
        classes = probabilities.shape[1]
        frequencies = np.bincount(probabilities.argmax(axis=1), minlength=classes) / len(labels)
        return cls(
            pixel_max=float(pixel_max),
            atc_threshold=float(confidence[cut]),
            class_frequencies=frequencies.astype(np.float64),
            embedding_mean=embeddings.mean(axis=0).astype(np.float64),
            embedding_std=embeddings.std(axis=0).astype(np.float64) + 1e-6,
            input_mean=inputs.mean(axis=0),
            input_std=inputs.std(axis=0) + 1e-9,
        )


def window_features(
    stats: ReferenceStats,
    images: npt.NDArray[Any],
    probabilities: npt.NDArray[Any],
    embeddings: npt.NDArray[Any],
) -> FloatArray:
    """The six statistics (`FEATURES`) of one window."""
    confidence = probabilities.max(axis=1)
    classes = len(stats.class_frequencies)
    frequencies = np.bincount(probabilities.argmax(axis=1), minlength=classes) / len(confidence)
    shift = (embeddings.mean(axis=0) - stats.embedding_mean) / stats.embedding_std
    inputs = image_statistics(images, stats.pixel_max)
    return np.array(
        [
            confidence.mean(),
            (confidence >= stats.atc_threshold).mean(),
            0.5 * np.abs(frequencies - stats.class_frequencies).sum(),
            np.sqrt((shift**2).mean()),
            (embeddings.std(axis=0) / stats.embedding_std).mean(),
            np.abs((inputs.mean(axis=0) - stats.input_mean) / stats.input_std).mean(),
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class TreeEnsemble:
    """A gradient-boosted regression tree ensemble as flat arrays: `init + rate * sum(trees)`.

    Node `i` of the concatenated trees splits on `feature[i] <= threshold[i]` into `left[i]` /
    `right[i]` (absolute indices), or is a leaf (`left[i] == -1`) worth `value[i]`; `roots`
    holds each tree's first node.
    """

    init: float
    rate: float
    roots: npt.NDArray[np.int64]
    feature: npt.NDArray[np.int64]
    threshold: FloatArray
    left: npt.NDArray[np.int64]
    right: npt.NDArray[np.int64]
    value: FloatArray

    def predict(self, x: FloatArray) -> float:
        total = 0.0
        for root in self.roots:
            node = int(root)
            while self.left[node] != -1:
                goes_left = x[self.feature[node]] <= self.threshold[node]
                node = int(self.left[node] if goes_left else self.right[node])
            total += float(self.value[node])
        return self.init + self.rate * total


@dataclass(frozen=True)
class AccuracyEstimator:
    """Reference statistics plus the fitted trees: `estimate(...)` gives an accuracy in [0, 1]."""

    stats: ReferenceStats
    trees: TreeEnsemble
    windows: int  # synthetic windows it was fitted on
    window_size: int
    # The bundle's log basis: the statistics are of embeddings as the log keeps them, and
    # whole embeddings are projected onto it first. None: whole embeddings throughout.
    basis: LogBasis | None = None

    def estimate(
        self,
        images: npt.NDArray[Any],
        probabilities: npt.NDArray[Any],
        embeddings: npt.NDArray[Any],
    ) -> float:
        """The estimated accuracy of one window: embeddings whole or as logged."""
        features = window_features(self.stats, images, probabilities, self.as_logged(embeddings))
        return float(np.clip(self.trees.predict(features), 0.0, 1.0))

    @property
    def embedding_width(self) -> int:
        """The width of embeddings as this estimator's statistics hold them."""
        return len(self.stats.embedding_mean)

    def as_logged(self, embeddings: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Whole embeddings projected onto the log basis; logged coordinates as they are."""
        if self.basis is not None and embeddings.shape[1] == len(self.basis.mean):
            return self.basis.project(embeddings)
        if embeddings.shape[1] != self.embedding_width:
            raise MonitorError(
                f"embeddings of width {embeddings.shape[1]} do not fit this estimator (width "
                f"{self.embedding_width}): they come from another model"
            )
        return embeddings

    def save(self, path: Path) -> None:
        """As one `.npz` of plain arrays (loaded without unpickling anything)."""
        stats, trees = self.stats, self.trees
        arrays: dict[str, npt.NDArray[Any]] = {
            "scalars": np.array(
                [
                    stats.pixel_max,
                    stats.atc_threshold,
                    trees.init,
                    trees.rate,
                    self.windows,
                    self.window_size,
                ],
                dtype=np.float64,
            ),
            "class_frequencies": stats.class_frequencies,
            "embedding_mean": stats.embedding_mean,
            "embedding_std": stats.embedding_std,
            "input_mean": stats.input_mean,
            "input_std": stats.input_std,
            "roots": trees.roots,
            "feature": trees.feature,
            "threshold": trees.threshold,
            "left": trees.left,
            "right": trees.right,
            "value": trees.value,
        }
        if self.basis is not None:
            arrays |= self.basis.arrays()
        # numpy's stubs cannot tell these names from its `allow_pickle` flag.
        np.savez(path, **arrays)  # type: ignore[arg-type]


def load_estimator(path: Path) -> AccuracyEstimator:
    """The estimator a bundle carries; a `MonitorError` if the file is not one."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
        pixel_max, atc, init, rate, windows, size = (float(v) for v in arrays["scalars"])
        stats = ReferenceStats(
            pixel_max=pixel_max,
            atc_threshold=atc,
            class_frequencies=arrays["class_frequencies"],
            embedding_mean=arrays["embedding_mean"],
            embedding_std=arrays["embedding_std"],
            input_mean=arrays["input_mean"],
            input_std=arrays["input_std"],
        )
        trees = TreeEnsemble(
            init,
            rate,
            arrays["roots"],
            arrays["feature"],
            arrays["threshold"],
            arrays["left"],
            arrays["right"],
            arrays["value"],
        )
    except (OSError, KeyError, ValueError) as exc:
        raise MonitorError(
            f"{path} is not an accuracy estimator ({exc}); re-export the bundle"
        ) from exc
    basis = None
    if all(name in arrays for name in LOG_BASIS_ARRAYS):
        basis = LogBasis(*(arrays[name] for name in LOG_BASIS_ARRAYS))
    return AccuracyEstimator(stats, trees, int(windows), int(size), basis)


# --- fitting, at export time (needs the `train` extra: scikit-learn) ---------------------------


def synthetic_windows(
    predict: Any,
    images: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    stats: ReferenceStats,
    *,
    window: int,
    seed: int,
    repeats: int = 3,
    exclude: str | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Features and true accuracy of clean, shifted and partly shifted windows of `images`.

    Every corruption runs at seven strengths, from milder than its severity 1 to its severity 3,
    on whole windows, and at its middle strength on windows where only a quarter, half or three
    quarters of the examples are shifted (how a drift begins). `predict(images)` returns the
    model's (probabilities, embeddings); `exclude` leaves one corruption out.
    """
    from opsloop.corruption import CORRUPTIONS

    rng = np.random.default_rng(seed)
    size = min(window, len(images))
    plans: list[tuple[str | None, float, float]] = [(None, 0.0, 0.0)] * (4 * repeats)
    for family, corruption in CORRUPTIONS.items():
        if family == exclude:
            continue
        low, mid, high = corruption.levels
        strengths = np.linspace(low - (mid - low), high, 7)  # from milder than severity 1
        plans += [(family, float(level), 1.0) for level in strengths for _ in range(repeats)]
        plans += [(family, mid, share) for share in (0.25, 0.5, 0.75) for _ in range(repeats)]
    features, accuracy = [], []
    for name, level, share in plans:
        pick = rng.choice(len(images), size=size, replace=False)
        batch = images[pick].astype(np.float64)
        if name is not None:
            shifted = rng.random(size) < share
            changed = CORRUPTIONS[name].transform(batch[shifted], level, stats.pixel_max, rng)
            batch[shifted] = np.clip(changed, 0.0, stats.pixel_max)
        probabilities, embeddings = predict(batch.astype(np.float32))
        features.append(window_features(stats, batch, probabilities, embeddings))
        accuracy.append(float((probabilities.argmax(axis=1) == labels[pick]).mean()))
    return np.array(features), np.array(accuracy)


def fit_estimator(
    predict: Any,
    images: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    pixel_max: float,
    *,
    window: int = 200,
    seed: int = 0,
    exclude: str | None = None,
    basis: LogBasis | None = None,
) -> AccuracyEstimator:
    """Fit the estimator of the model behind `predict` on its labelled validation `images`.

    `exclude` leaves one corruption out of the synthetic shifts (the benchmark uses it to measure
    how the estimate does on a kind of shift it never saw).
    """
    from sklearn.ensemble import GradientBoostingRegressor

    if basis is not None:  # fitted on embeddings as the log keeps them
        whole = predict

        def predict(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
            probabilities, embeddings = whole(batch)
            return probabilities, basis.project(embeddings)

    probabilities, embeddings = predict(images.astype(np.float32))
    stats = ReferenceStats.fit(images, probabilities, embeddings, labels, pixel_max)
    x, y = synthetic_windows(
        predict, images, labels, stats, window=window, seed=seed, exclude=exclude
    )
    model = GradientBoostingRegressor(
        n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=seed
    ).fit(x, y)
    trees = _flatten(model, x.shape[1])
    logger.info("fitted the accuracy estimator on %d synthetic windows of %d", len(y), window)
    return AccuracyEstimator(stats, trees, len(y), min(window, len(images)), basis)


def _flatten(model: Any, n_features: int) -> TreeEnsemble:
    """sklearn's fitted trees as the flat arrays `TreeEnsemble` walks."""
    roots, feature, threshold, left, right, value = [], [], [], [], [], []
    offset = 0
    for estimator in model.estimators_[:, 0]:
        tree = estimator.tree_
        roots.append(offset)
        is_leaf = tree.children_left == -1
        feature.append(np.where(is_leaf, 0, tree.feature))
        threshold.append(tree.threshold)
        left.append(np.where(is_leaf, -1, tree.children_left + offset))
        right.append(np.where(is_leaf, -1, tree.children_right + offset))
        value.append(tree.value[:, 0, 0])
        offset += tree.node_count
    init = float(model.init_.predict(np.zeros((1, n_features)))[0])
    return TreeEnsemble(
        init=init,
        rate=float(model.learning_rate),
        roots=np.array(roots, dtype=np.int64),
        feature=np.concatenate(feature).astype(np.int64),
        threshold=np.concatenate(threshold).astype(np.float64),
        left=np.concatenate(left).astype(np.int64),
        right=np.concatenate(right).astype(np.int64),
        value=np.concatenate(value).astype(np.float64),
    )
