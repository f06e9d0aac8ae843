"""Dataset sources: each turns a `DataConfig` into a `RawDataset` on the source's own pixel scale.

A new dataset is one loader function here (or in its own module, like `idx.py`) registered in
`SOURCES`, plus one YAML file under `configs/data/` naming it as `source`. Config validation reads
`SOURCES`, so an unknown source fails when the config loads, listing the registered ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from opsloop.config import DataConfig
from opsloop.data.raw import RawDataset
from opsloop.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def load_raw_dataset(cfg: DataConfig) -> RawDataset:
    """Load the dataset that `cfg.source` names."""
    try:
        loader = SOURCES[cfg.source]
    except KeyError:
        raise ConfigError(
            f"data.source='{cfg.source}' is unknown; use one of: {', '.join(SOURCES)}"
        ) from None
    return loader(cfg)


def _load_idx(cfg: DataConfig) -> RawDataset:
    from opsloop.data.idx import load_idx_dataset  # keeps urllib/gzip off the digits path

    return load_idx_dataset(cfg)


def load_digits_dataset(cfg: DataConfig) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (0-16 integer pixels): no download, always available."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    pixels = images.round().astype(np.uint8)[:, None, :, :]  # the values are already integers
    labels = np.asarray(bunch.target, dtype=np.int64)
    class_names = cfg.class_names or [str(name) for name in bunch.target_names]
    return RawDataset(
        images=pixels,
        labels=labels,
        class_names=list(class_names),
        source="sklearn.datasets.load_digits",
        pixel_max=16.0,
    )


def load_imagefolder_dataset(cfg: DataConfig) -> RawDataset:
    """A user's own tree `root/<class>/*.png|jpg`, converted to `cfg.channels` and resized."""
    root = _imagefolder_root(cfg)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class folders; lay images out as {root}/<class>/*.png")
    images: list[npt.NDArray[np.uint8]] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add images or remove the folder"
            )
        for path in files:
            images.append(read_image(path, channels=cfg.channels, size=cfg.image_size))
            labels.append(label)
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(
            f"images under {root} have different sizes {sorted(shapes)}; set data.image_size=N "
            "to resize them all to N x N"
        )
    logger.info("read %d images in %d classes from %s", len(images), len(class_dirs), root)
    return RawDataset(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=[d.name for d in class_dirs],
        source=str(root),
        pixel_max=255.0,
    )


def _imagefolder_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError("data.root is not set; pass data.root=DIR with DIR/<class>/*.png")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a directory; point it at DIR/<class>/*.png")
    return root


def read_image(path: Path, *, channels: int, size: int | None) -> npt.NDArray[np.uint8]:
    """One image file as uint8 (C, H, W); an unreadable file is a `DataError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            if size is not None:
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; fix or delete the file") from exc
    return array[None, :, :] if array.ndim == 2 else np.transpose(array, (2, 0, 1))


def _load_production(cfg: DataConfig) -> RawDataset:
    from opsloop.data.production import load_production_dataset  # reads the prediction log

    return load_production_dataset(cfg)


Loader = Callable[[DataConfig], RawDataset]
# Every dataset source by the name `data.source` gives it.
SOURCES: dict[str, Loader] = {
    "digits": load_digits_dataset,
    "idx": _load_idx,
    "imagefolder": load_imagefolder_dataset,
    "production": _load_production,
}
