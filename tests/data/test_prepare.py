"""The data contract: shapes, dtypes, labels, disjoint seeded splits, stats, atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from opsloop.config import DataConfig
from opsloop.data import SPLITS, RawDataset, load_split, prepare_dataset, read_manifest
from opsloop.data.prepare import hash_splits, split_dataset
from opsloop.errors import DataError


def unique_images(n: int, classes: int) -> RawDataset:
    """Images whose first two pixels encode their index, so every image is distinguishable."""
    images = np.zeros((n, 1, 4, 4), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    labels = (np.arange(n) % classes).astype(np.int64)
    return RawDataset(images, labels, [str(c) for c in range(classes)], "test", 255.0)


def image_ids(images: np.ndarray) -> set[int]:
    return {int(i[0, 0, 0]) + 256 * int(i[0, 0, 1]) for i in images}


def test_digits_contract(digits_cfg: DataConfig) -> None:
    result = prepare_dataset(digits_cfg)
    assert result.written
    assert result.path == Path(digits_cfg.processed_dir) / "digits"
    assert sum(result.counts.values()) == 1797
    for split in SPLITS:
        arrays = load_split(result.path, split)
        assert arrays.images.dtype == np.uint8
        assert arrays.images.shape[1:] == (1, 8, 8)
        assert arrays.labels.dtype == np.int64
        assert arrays.labels.min() >= 0
        assert arrays.labels.max() <= 9
        assert arrays.images.max() <= 16
        assert len(arrays.labels) == result.counts[split]
        # Stratified: every class appears in every split.
        assert set(np.unique(arrays.labels)) == set(range(10))


def test_manifest_describes_the_dataset(digits_cfg: DataConfig) -> None:
    result = prepare_dataset(digits_cfg)
    manifest = read_manifest(result.path)
    train = load_split(result.path, "train").images.astype(np.float64)
    assert manifest.content_hash == result.content_hash
    assert manifest.class_names == [str(i) for i in range(10)]
    assert manifest.image_shape == [1, 8, 8]
    assert manifest.pixel_max == 16.0
    assert manifest.pixel_mean[0] == pytest.approx(train.mean(), abs=1e-5)
    assert manifest.pixel_std[0] == pytest.approx(train.std(), abs=1e-5)
    assert manifest.source == "sklearn.datasets.load_digits"
    assert sum(manifest.class_counts["train"]) == manifest.counts["train"]
    assert set(manifest.files) == {f"{s}_{k}.npy" for s in SPLITS for k in ("images", "labels")}
    on_disk = json.loads((result.path / "manifest.json").read_text())
    assert on_disk["opsloop_version"]
    assert on_disk["seed"] == digits_cfg.seed


def test_splits_are_disjoint_and_complete() -> None:
    raw = unique_images(300, 3)
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.1, seed=3)
    splits = split_dataset(raw, cfg)
    ids = {name: image_ids(split.images) for name, split in splits.items()}
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == set(range(300))
    assert (len(ids["val"]), len(ids["test"])) == (60, 30)


def test_same_seed_same_split_other_seed_other_split() -> None:
    raw = unique_images(200, 4)
    first = split_dataset(raw, DataConfig(seed=1))
    again = split_dataset(raw, DataConfig(seed=1))
    other = split_dataset(raw, DataConfig(seed=2))
    assert image_ids(first["test"].images) == image_ids(again["test"].images)
    assert image_ids(first["test"].images) != image_ids(other["test"].images)
    hashes = [hash_splits(s, raw.class_names, 255.0) for s in (first, again, other)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_images_and_labels_stay_paired() -> None:
    raw = unique_images(120, 4)
    for split in split_dataset(raw, DataConfig(seed=5)).values():
        for image, label in zip(split.images, split.labels, strict=True):
            assert (int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])) % 4 == label


def test_official_test_split_is_kept() -> None:
    raw = unique_images(100, 2)
    test_images = np.full((10, 1, 4, 4), 7, dtype=np.uint8)
    test_labels = np.zeros(10, dtype=np.int64)
    with_test = dataclasses.replace(raw, test_images=test_images, test_labels=test_labels)
    splits = split_dataset(with_test, DataConfig(val_fraction=0.1))
    assert np.array_equal(splits["test"].images, test_images)
    assert len(splits["train"].labels) + len(splits["val"].labels) == 100


def test_rerun_is_a_no_op(digits_cfg: DataConfig) -> None:
    first = prepare_dataset(digits_cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = prepare_dataset(digits_cfg)
    assert not second.written
    assert second.content_hash == first.content_hash
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == stamps


def test_changed_seed_rewrites_with_new_hash(digits_cfg: DataConfig) -> None:
    first = prepare_dataset(digits_cfg)
    second = prepare_dataset(dataclasses.replace(digits_cfg, seed=digits_cfg.seed + 1))
    assert second.written
    assert second.content_hash != first.content_hash
    assert read_manifest(second.path).content_hash == second.content_hash


def test_tampered_file_is_rebuilt(digits_cfg: DataConfig) -> None:
    first = prepare_dataset(digits_cfg)
    (first.path / "val_labels.npy").write_bytes(b"garbage")
    again = prepare_dataset(digits_cfg)
    assert again.written
    assert load_split(again.path, "val").labels.shape == (first.counts["val"],)


def test_unwritable_output_leaves_nothing(digits_cfg: DataConfig, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    cfg = dataclasses.replace(digits_cfg, processed_dir=str(blocker / "processed"))
    with pytest.raises(DataError, match=r"cannot write the dataset.*data.processed_dir"):
        prepare_dataset(cfg)
    assert blocker.read_text() == "a file where a directory should be"


def test_crash_mid_write_keeps_previous_dataset(
    digits_cfg: DataConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_dataset(digits_cfg)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    calls = {"n": 0}
    real_save = np.save

    def failing_save(path: Path, array: np.ndarray, allow_pickle: bool = False) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_save(path, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(DataError, match="No space left on device"):
        prepare_dataset(dataclasses.replace(digits_cfg, seed=99))
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["digits"]


def test_missing_dataset_says_which_command_makes_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="opsloop data data=digits"):
        load_split(tmp_path / "digits", "train")


def test_unknown_split_is_rejected(digits_cfg: DataConfig) -> None:
    result = prepare_dataset(digits_cfg)
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_split(result.path, "holdout")


def test_labels_outside_class_names_are_rejected() -> None:
    images = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    with pytest.raises(DataError, match="class_names"):
        RawDataset(images, np.array([0, 1, 5]), ["a", "b"], "bad", 255.0)


def test_empty_split_is_an_error() -> None:
    raw = unique_images(4, 2)  # two images per class: nothing left for a test split
    with pytest.raises(DataError, match=r"split of .* is empty"):
        split_dataset(raw, DataConfig(val_fraction=0.1, test_fraction=0.1))
