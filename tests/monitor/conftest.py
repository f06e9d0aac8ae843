"""Fixtures for the monitoring tests: the reference of a trained bundle and held-out digits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.config import DataConfig
from opsloop.data import dataset_dir, load_split
from opsloop.monitor import (
    ReferenceData,
    load_reference,
)
from tests.monitor.samples import Images

if TYPE_CHECKING:
    from opsloop.export import ExportResult


@pytest.fixture(scope="module")
def reference(bundle: ExportResult) -> ReferenceData:
    return load_reference(bundle.path)


@pytest.fixture(scope="module")
def holdout_split(trained: tuple[Path, DataConfig]) -> tuple[Images, npt.NDArray[np.int64]]:
    """The held-out digits test split: disjoint from the reference (the val split)."""
    split = load_split(dataset_dir(trained[1]), "test")
    return split.images, split.labels
