"""The imagefolder source: a user's own root/<class>/*.png tree, and what bad trees say."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opsloop.config import DataConfig
from opsloop.data import load_split, prepare_dataset
from opsloop.errors import ConfigError, DataError


def write_tree(root: Path, per_class: int = 6, size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(folder / f"{i}{suffix}")


@pytest.fixture
def folder_cfg(digits_cfg: DataConfig, tmp_path: Path) -> DataConfig:
    root = tmp_path / "images"
    write_tree(root)
    return dataclasses.replace(
        digits_cfg,
        name="pets",
        source="imagefolder",
        root=str(root),
        image_size=8,
        class_names=None,
        val_fraction=0.2,
        test_fraction=0.2,
    )


def test_imagefolder_is_prepared(folder_cfg: DataConfig) -> None:
    result = prepare_dataset(folder_cfg)
    assert result.manifest.class_names == ["cat", "dog"]
    assert result.manifest.image_shape == [1, 8, 8]
    assert result.manifest.pixel_max == 255.0
    assert sum(result.counts.values()) == 12
    assert load_split(result.path, "train").images.dtype == np.uint8


def test_rgb_images_keep_three_channels(folder_cfg: DataConfig) -> None:
    result = prepare_dataset(dataclasses.replace(folder_cfg, channels=3))
    assert result.manifest.image_shape == [3, 8, 8]
    assert len(result.manifest.pixel_mean) == 3


def test_unreadable_image_names_the_file(folder_cfg: DataConfig) -> None:
    assert folder_cfg.root is not None
    broken = Path(folder_cfg.root) / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png.*fix or delete"):
        prepare_dataset(folder_cfg)
    assert not Path(folder_cfg.processed_dir).exists()


def test_empty_class_folder_names_the_folder(folder_cfg: DataConfig) -> None:
    assert folder_cfg.root is not None
    (Path(folder_cfg.root) / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder .*bird has no images"):
        prepare_dataset(folder_cfg)


def test_root_without_class_folders(folder_cfg: DataConfig, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        prepare_dataset(dataclasses.replace(folder_cfg, root=str(empty)))


def test_mixed_sizes_need_image_size(folder_cfg: DataConfig) -> None:
    assert folder_cfg.root is not None
    Image.new("L", (5, 5)).save(Path(folder_cfg.root) / "cat" / "small.png")
    with pytest.raises(DataError, match=r"data.image_size"):
        prepare_dataset(dataclasses.replace(folder_cfg, image_size=None))


def test_missing_root(folder_cfg: DataConfig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.root is not set"):
        prepare_dataset(dataclasses.replace(folder_cfg, root=None))
    with pytest.raises(DataError, match="is not a directory"):
        prepare_dataset(dataclasses.replace(folder_cfg, root=str(tmp_path / "nope")))
