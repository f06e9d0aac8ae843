"""The LightningDataModule serves raw-pixel float batches, shuffled reproducibly."""

from __future__ import annotations

from dataclasses import replace

import torch

from opsloop.config import DataConfig
from opsloop.data import prepare_dataset
from opsloop.data.datamodule import ProcessedDataModule


def test_batches_have_the_manifest_shape(digits_cfg: DataConfig) -> None:
    prepare_dataset(digits_cfg)
    module = ProcessedDataModule.from_config(digits_cfg)
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (digits_cfg.batch_size, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert float(images.max()) <= 16.0  # raw pixels: normalisation happens inside the model
    total = sum(len(batch[1]) for batch in module.test_dataloader())
    assert total == module.manifest.counts["test"]


def test_shuffle_is_reproducible_by_seed(digits_cfg: DataConfig) -> None:
    prepare_dataset(digits_cfg)
    first = next(iter(ProcessedDataModule.from_config(digits_cfg, seed=1).train_dataloader()))
    again = next(iter(ProcessedDataModule.from_config(digits_cfg, seed=1).train_dataloader()))
    other = next(iter(ProcessedDataModule.from_config(digits_cfg, seed=2).train_dataloader()))
    assert torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    val = [b[1] for b in ProcessedDataModule.from_config(digits_cfg, seed=1).val_dataloader()]
    assert sum(len(v) for v in val) > 0


def test_worker_processes_load_the_same_batches_as_the_main_process(
    digits_cfg: DataConfig,
) -> None:
    prepare_dataset(digits_cfg)
    in_process = ProcessedDataModule.from_config(digits_cfg, seed=3)
    workers = ProcessedDataModule.from_config(replace(digits_cfg, num_workers=2), seed=3)
    loader = workers.train_dataloader()
    assert loader.num_workers == 2
    assert loader.persistent_workers  # the workers live across epochs, not restarted per epoch
    iterator = iter(loader)
    assert type(iterator).__name__ == "_MultiProcessingDataLoaderIter"  # really other processes
    expected = list(in_process.train_dataloader())
    got = list(iterator)
    assert len(got) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
        assert torch.equal(images, want_images)  # same order, same pixels: the seed decides
        assert torch.equal(labels, want_labels)
    second = torch.cat([labels for _, labels in loader])  # the next epoch, reshuffled
    first = torch.cat([labels for _, labels in got])
    assert not torch.equal(first, second)
    assert torch.equal(first.sort().values, second.sort().values)  # every example, once each
    assert len(first) == workers.manifest.counts["train"]
