"""A LightningDataModule over a processed dataset directory (imports Lightning: training only).

Batches are raw pixels as float32 on the dataset's own scale; normalisation lives inside the model
so the exported ONNX graph takes the same raw pixels the server receives.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from opsloop.config import DataConfig
from opsloop.data.prepare import Manifest, dataset_dir, load_split, read_manifest


class ProcessedDataModule(L.LightningDataModule):
    """Serves the train/val/test splits of `data/processed/<name>/` as DataLoaders."""

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.manifest: Manifest = read_manifest(self.path)  # fails early with the fix
        self._datasets: dict[str, TensorDataset] = {}

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int = 0) -> ProcessedDataModule:
        return cls(
            dataset_dir(cfg),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory,
            seed=seed,
        )

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self._datasets:
                self._datasets[split] = self._tensor_dataset(split)

    def _tensor_dataset(self, split: str) -> TensorDataset:
        arrays = load_split(self.path, split)
        images = torch.from_numpy(arrays.images.astype("float32"))
        labels = torch.from_numpy(arrays.labels.astype("int64"))
        return TensorDataset(images, labels)

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader[tuple[torch.Tensor, ...]]:
        self.setup()
        # A seeded generator makes the shuffle order part of the run's reproducible state.
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader("test", shuffle=False)
