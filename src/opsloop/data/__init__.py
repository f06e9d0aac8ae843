"""Datasets: load a source (digits, MNIST-style IDX downloads, an image folder), split it
deterministically and write it atomically to `data/processed/<name>/` with a manifest.

Run it as `opsloop data [data=NAME] [data.key=value ...]`, or call `prepare_dataset(cfg.data)`.
Training reads the result through `opsloop.data.datamodule.ProcessedDataModule`.
"""

from opsloop.data.prepare import (
    SPLITS,
    DataResult,
    Manifest,
    Split,
    dataset_dir,
    load_split,
    prepare_dataset,
    read_manifest,
)
from opsloop.data.raw import RawDataset

__all__ = [
    "SPLITS",
    "DataResult",
    "Manifest",
    "RawDataset",
    "Split",
    "dataset_dir",
    "load_split",
    "prepare_dataset",
    "read_manifest",
]
