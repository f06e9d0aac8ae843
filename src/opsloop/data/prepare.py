"""Prepare a dataset into opsloop's one on-disk format, atomically and idempotently.

`data/processed/<name>/` holds `{train,val,test}_{images,labels}.npy` (uint8 NCHW images on the
source's pixel scale, int64 labels) and `manifest.json` (content hash, classes, counts, pixel stats,
provenance). Plain .npy files, not .npz: zip archives embed timestamps, and DVC should see identical
data as identical bytes. Re-running with identical inputs rewrites nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from opsloop import __version__
from opsloop.atomic import sha256_file, staged_directory
from opsloop.config import DataConfig
from opsloop.data.raw import RawDataset
from opsloop.data.sources import load_raw_dataset
from opsloop.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Split:
    """One split's arrays."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Manifest:
    """What a processed dataset is, where it came from, and the hash that identifies it."""

    name: str
    content_hash: str
    class_names: list[str]
    counts: dict[str, int]
    class_counts: dict[str, list[int]]
    image_shape: list[int]
    pixel_max: float
    pixel_mean: list[float]
    pixel_std: list[float]
    source: str
    seed: int
    val_fraction: float
    test_fraction: float | None
    opsloop_version: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            payload = json.loads(path.read_text())
            return cls(**payload)
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(
                f"cannot read dataset manifest {path}: {exc}; re-run `opsloop data` to rebuild it"
            ) from exc


@dataclass(frozen=True)
class DataResult:
    """The outcome of `prepare_dataset`."""

    name: str
    path: Path
    content_hash: str
    counts: dict[str, int]
    written: bool
    manifest: Manifest


def prepare_dataset(cfg: DataConfig) -> DataResult:
    """Load, split and write `cfg.name` under `cfg.processed_dir`; a no-op when nothing changed."""
    raw = load_raw_dataset(cfg)
    splits = split_dataset(raw, cfg)
    content_hash = hash_splits(splits, raw.class_names, raw.pixel_max)
    target = Path(cfg.processed_dir) / cfg.name
    existing = _existing_manifest(target)
    if existing is not None and existing.content_hash == content_hash and _files_match(target):
        logger.info("%s is up to date (%s); nothing written", target, content_hash[:12])
        return DataResult(cfg.name, target, content_hash, existing.counts, False, existing)
    manifest = build_manifest(cfg, raw, splits, content_hash)
    write_dataset_atomically(target, splits, manifest)
    logger.info("wrote %s (%s)", target, content_hash[:12])
    return DataResult(cfg.name, target, content_hash, manifest.counts, True, manifest)


def split_dataset(raw: RawDataset, cfg: DataConfig) -> dict[str, Split]:
    """Stratified train/val/test split, deterministic in `cfg.seed`.

    Hand-rolled per class instead of scikit-learn's `train_test_split`, which refuses classes with
    a single image: here every class keeps at least one training image, however small.
    """
    rng = np.random.default_rng(cfg.seed)
    official_test = raw.test_images is not None and raw.test_labels is not None
    test_fraction = 0.0 if official_test else cfg.test_fraction
    picks: dict[str, list[npt.NDArray[np.int64]]] = {name: [] for name in SPLITS}
    for label in range(len(raw.class_names)):
        members = rng.permutation(np.flatnonzero(raw.labels == label))
        n_test = min(round(len(members) * test_fraction), max(len(members) - 1, 0))
        n_val = min(round(len(members) * cfg.val_fraction), max(len(members) - n_test - 1, 0))
        picks["test"].append(members[:n_test])
        picks["val"].append(members[n_test : n_test + n_val])
        picks["train"].append(members[n_test + n_val :])
    splits: dict[str, Split] = {}
    for name in SPLITS:
        # A seeded shuffle across classes, so batches are not sorted by class.
        order = rng.permutation(np.concatenate(picks[name]).astype(np.int64))
        splits[name] = Split(raw.images[order], raw.labels[order])
    if raw.test_images is not None and raw.test_labels is not None:
        splits["test"] = Split(raw.test_images, raw.test_labels)
    for name, split in splits.items():
        if len(split.labels) == 0:
            raise DataError(
                f"the {name} split of {cfg.name} is empty; add images or raise data.{name}_fraction"
            )
    return splits


def hash_splits(splits: dict[str, Split], class_names: list[str], pixel_max: float) -> str:
    """SHA-256 over every array's dtype, shape and bytes, the class names and the pixel scale."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"classes": class_names, "pixel_max": pixel_max}).encode())
    for name in SPLITS:
        for kind, array in (("images", splits[name].images), ("labels", splits[name].labels)):
            digest.update(f"{name}/{kind}/{array.dtype.str}/{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def build_manifest(
    cfg: DataConfig, raw: RawDataset, splits: dict[str, Split], content_hash: str
) -> Manifest:
    """Describe the prepared dataset: counts, per-class counts, train-split pixel statistics."""
    train = splits["train"].images.astype(np.float64)
    num_classes = len(raw.class_names)
    return Manifest(
        name=cfg.name,
        content_hash=content_hash,
        class_names=list(raw.class_names),
        counts={name: len(splits[name].labels) for name in SPLITS},
        class_counts={
            name: np.bincount(splits[name].labels, minlength=num_classes).tolist()
            for name in SPLITS
        },
        image_shape=list(raw.images.shape[1:]),
        pixel_max=raw.pixel_max,
        pixel_mean=[round(float(v), 6) for v in train.mean(axis=(0, 2, 3))],
        pixel_std=[round(float(v), 6) for v in train.std(axis=(0, 2, 3))],
        source=raw.source,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=None if raw.test_images is not None else cfg.test_fraction,
        opsloop_version=__version__,
    )


def write_dataset_atomically(target: Path, splits: dict[str, Split], manifest: Manifest) -> None:
    """Write into a sibling staging dir, then swap it in: a crash keeps the previous dataset."""
    try:
        with staged_directory(target) as staging:
            files: dict[str, str] = {}
            for name in SPLITS:
                split = splits[name]
                for kind, array in (("images", split.images), ("labels", split.labels)):
                    path = staging / f"{name}_{kind}.npy"
                    np.save(path, array, allow_pickle=False)
                    files[path.name] = sha256_file(path)
            final = Manifest(**{**asdict(manifest), "files": files})
            (staging / MANIFEST_NAME).write_text(final.to_json())
    except OSError as exc:
        raise DataError(
            f"cannot write the dataset to {target}: {exc.strerror or exc}; "
            "make the directory writable or choose another data.processed_dir"
        ) from exc


def _existing_manifest(target: Path) -> Manifest | None:
    path = target / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.from_file(path)
    except DataError:
        return None  # unreadable: rebuild it


def _files_match(target: Path) -> bool:
    """Whether every file the manifest lists is present with its recorded checksum."""
    manifest = Manifest.from_file(target / MANIFEST_NAME)
    expected = {f"{s}_{k}.npy" for s in SPLITS for k in ("images", "labels")}
    if set(manifest.files) != expected:
        return False
    return all(
        (target / name).is_file() and sha256_file(target / name) == digest
        for name, digest in manifest.files.items()
    )


def dataset_dir(cfg: DataConfig) -> Path:
    """Where `cfg`'s processed dataset lives."""
    return Path(cfg.processed_dir) / cfg.name


def read_manifest(path: Path) -> Manifest:
    """The manifest of a processed dataset directory; a clear error if it was never prepared."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(
            f"no processed dataset at {path}; run `opsloop data data={path.name}` to make it"
        )
    return Manifest.from_file(manifest_path)


def load_split(path: Path, split: str) -> Split:
    """Load one split's arrays (never unpickling anything)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    read_manifest(path)  # a clear error when the dataset is missing
    try:
        images = np.load(path / f"{split}_images.npy", allow_pickle=False)
        labels = np.load(path / f"{split}_labels.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot load the {split} split from {path}: {exc}; re-run `opsloop data`"
        ) from exc
    return Split(images, labels)
