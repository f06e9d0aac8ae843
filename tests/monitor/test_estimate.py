"""The label-free accuracy estimator: trees read in numpy as sklearn fits them, saved without
pickle, and estimates that follow the truth on clean and shifted held-out windows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.bundle import EMBEDDING, PROBABILITIES, load_bundle, onnx_session, run_onnx
from opsloop.config import DataConfig
from opsloop.corruption import CORRUPTIONS
from opsloop.data import dataset_dir, load_split
from opsloop.errors import MonitorError
from opsloop.monitor.estimate import ESTIMATOR_FILE, _flatten, load_estimator

if TYPE_CHECKING:
    from opsloop.export import ExportResult


def test_the_flattened_trees_predict_what_sklearn_predicts() -> None:
    from sklearn.ensemble import GradientBoostingRegressor

    rng = np.random.default_rng(0)
    x = rng.random((120, 6))
    y = np.sin(3 * x[:, 0]) + x[:, 3] ** 2
    model = GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0).fit(x, y)
    trees = _flatten(model, 6)
    probe = rng.random((20, 6))
    ours = [trees.predict(row) for row in probe]
    assert ours == pytest.approx(model.predict(probe), abs=1e-9)


def test_the_bundle_ships_an_estimator_that_round_trips(
    bundle: ExportResult, tmp_path: Path
) -> None:
    estimator = load_estimator(bundle.path / ESTIMATOR_FILE)
    assert estimator.windows > 100
    copy = tmp_path / "estimator.npz"
    estimator.save(copy)
    again = load_estimator(copy)
    assert np.array_equal(again.trees.threshold, estimator.trees.threshold)
    assert again.stats.atc_threshold == estimator.stats.atc_threshold
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(MonitorError, match="is not an accuracy estimator"):
        load_estimator(tmp_path / "bad.npz")


def test_estimates_follow_the_truth_on_held_out_windows(
    bundle: ExportResult, trained: tuple[Path, DataConfig]
) -> None:
    """The bundle's model on test images it never saw, clean and under a strong corruption."""
    estimator = load_estimator(bundle.path / ESTIMATOR_FILE)
    session = onnx_session(load_bundle(bundle.path).model_path)
    test = load_split(dataset_dir(trained[1]), "test")
    rng = np.random.default_rng(3)

    def truth_and_estimate(
        images: npt.NDArray[Any], labels: npt.NDArray[Any]
    ) -> tuple[float, float]:
        outputs = run_onnx(session, images.astype(np.float32))
        probabilities, embeddings = outputs[PROBABILITIES], outputs[EMBEDDING]
        true = float((probabilities.argmax(axis=1) == labels).mean())
        return true, estimator.estimate(images, probabilities, embeddings)

    pick = rng.choice(len(test.labels), size=200, replace=False)
    clean_true, clean_estimate = truth_and_estimate(test.images[pick], test.labels[pick])
    assert abs(clean_estimate - clean_true) < 0.1
    faded = CORRUPTIONS["contrast"](test.images[pick], 3, pixel_max=16.0, rng=rng)
    shifted_true, shifted_estimate = truth_and_estimate(faded, test.labels[pick])
    assert shifted_true < clean_true - 0.3  # the shift really hurts this model
    assert abs(shifted_estimate - shifted_true) < 0.2
    assert shifted_estimate < clean_estimate - 0.2  # and the estimate sees it, without labels
