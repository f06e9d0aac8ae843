"""The model: a small CNN (`ConvNet`) and the LightningModule that trains it (`ImageClassifier`).

`ConvNet` takes raw pixels on the dataset's own scale and normalises them inside the graph with
the manifest's mean/std, so the exported ONNX model needs no preprocessing outside it. It adapts
to any image shape and class count, and exposes its penultimate layer as an embedding for drift
monitoring. Import this module only where torch is wanted (training, evaluation, export).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from opsloop.config import MODELS, ModelConfig, OptimConfig, resolve_object
from opsloop.errors import CheckpointError, ConfigError, DataError, first_line

if TYPE_CHECKING:
    from opsloop.data import Manifest


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics stored as buffers (saved and exported)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        safe_std = [max(float(s), 1e-6) for s in std]  # a constant channel must not divide by 0
        self.register_buffer("std", torch.tensor(safe_std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def conv_block(in_channels: int, out_channels: int, *, pool: bool) -> nn.Sequential:
    """Two 3x3 conv + batch-norm + ReLU layers, then a 2x2 max-pool while the image is large."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """A CNN for (C, H, W) images of any size: conv blocks, global pooling, an embedding, logits."""

    def __init__(
        self,
        *,
        image_shape: Sequence[int],
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        channels: int = 32,
        depth: int = 2,
        hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels, height, width = (int(d) for d in image_shape)
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        self.normalize = Normalize(pixel_mean, pixel_std)
        blocks: list[nn.Module] = []
        size = min(height, width)
        for index in range(depth):
            out_channels = channels * 2**index
            pool = size >= 4  # keep at least a 2x2 map before global pooling
            blocks.append(conv_block(in_channels, out_channels, pool=pool))
            size = size // 2 if pool else size
            in_channels = out_channels
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the penultimate-layer embedding for a batch of raw-pixel images."""
        embedding = self.embed(self.features(self.normalize(x)))
        return self.head(self.dropout(embedding)), embedding

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_embedding(x)[0]


def build_model(
    cfg: ModelConfig,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
) -> ConvNet:
    """The network `cfg.name` names in `opsloop.config.MODELS`, shaped for one dataset."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name='{cfg.name}' is unknown; use one of: {', '.join(MODELS)}")
    network: type[ConvNet] = resolve_object(MODELS[cfg.name])
    return network(
        image_shape=image_shape,
        num_classes=num_classes,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        channels=cfg.channels,
        depth=cfg.depth,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
    )


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of a `ConvNet` with accuracy and macro-F1 from torchmetrics.

    Its hyperparameters are plain dicts and lists, so a checkpoint describes itself and loads with
    `weights_only=True` (no unpickling of arbitrary objects).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        image_shape: list[int],
        class_names: list[str],
        pixel_mean: list[float],
        pixel_std: list[float],
        pixel_max: float,
    ) -> None:
        super().__init__()
        # Saved into checkpoints, not sent to the logger: training logs the whole resolved
        # config as params itself, under the config's own key names.
        self.save_hyperparameters(logger=False)
        self.model_cfg = ModelConfig(**model)
        self.optim_cfg = OptimConfig(**optim)
        self.class_names = list(class_names)
        self.net = build_model(
            self.model_cfg,
            image_shape=image_shape,
            num_classes=len(class_names),
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=self.optim_cfg.label_smoothing)
        num_classes = len(class_names)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": metric
                for stage in ("train", "val", "test")
                for name, metric in (
                    ("acc", torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)),
                    (
                        "f1",
                        torchmetrics.F1Score(
                            task="multiclass", num_classes=num_classes, average="macro"
                        ),
                    ),
                )
            }
        )
        self.example_input_array = torch.zeros(2, *image_shape)

    @classmethod
    def for_dataset(
        cls,
        model: ModelConfig,
        optim: OptimConfig,
        *,
        image_shape: Sequence[int],
        class_names: Sequence[str],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        pixel_max: float,
    ) -> ImageClassifier:
        return cls(
            model=asdict(model),
            optim=asdict(optim),
            image_shape=[int(d) for d in image_shape],
            class_names=list(class_names),
            pixel_mean=[float(v) for v in pixel_mean],
            pixel_std=[float(v) for v in pixel_std],
            pixel_max=float(pixel_max),
        )

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits

    def _step(self, batch: Sequence[Tensor], stage: str) -> Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss: Tensor = self.loss_fn(logits, labels)
        on_step = stage == "train"
        # Under DDP each process sees a shard: average val/test losses across processes so
        # checkpointing and early stopping decide alike everywhere (torchmetrics sync themselves).
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=True,
            on_step=on_step,
            on_epoch=True,
            sync_dist=not on_step,
        )
        for name in ("acc", "f1"):
            metric = cast(torchmetrics.Metric, self.metrics[f"{stage}_{name}"])
            metric(logits, labels)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc", on_epoch=True)
        return loss

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return torch.softmax(self(batch[0]), dim=-1)

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.optim_cfg, self.parameters())
        scheduler = make_scheduler(self.optim_cfg, optimizer, self.trainer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def make_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    raise ConfigError(f"optim.optimizer='{cfg.optimizer}' is unknown; use adamw, adam or sgd")


def make_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, trainer: L.Trainer
) -> dict[str, Any] | None:
    """A per-step learning-rate schedule sized from the trainer's real step count."""
    if cfg.scheduler == "none":
        return None
    total_steps = max(int(trainer.estimated_stepping_batches), 1)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    elif cfg.scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps
        )
    elif cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(total_steps // 3, 1), gamma=0.1
        )
    else:
        raise ConfigError(
            f"optim.scheduler='{cfg.scheduler}' is unknown; use cosine, onecycle, step or none"
        )
    return {"scheduler": scheduler, "interval": "step"}


def load_classifier(path: str | Path) -> ImageClassifier:
    """Load a trained `ImageClassifier` from a Lightning checkpoint, safely.

    The checkpoint is read with `weights_only=True`, so a tampered file cannot run code. A missing,
    corrupt or foreign file is a `CheckpointError` naming it.
    """
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint} does not exist; pass a .ckpt written by `opsloop train`"
        )
    try:
        classifier = ImageClassifier.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=True
        )
    except (
        pickle.UnpicklingError,  # torch's weights_only loader refuses garbage and foreign pickles
        RuntimeError,
        KeyError,
        TypeError,
        ValueError,
        EOFError,
        OSError,
    ) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {checkpoint}: {first_line(exc)}; "
            "use a checkpoint written by `opsloop train` for this model and dataset"
        ) from exc
    classifier.eval()
    return classifier


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint expects of its input, from its saved hyperparameters."""

    image_shape: list[int]
    class_names: list[str]
    pixel_max: float

    @classmethod
    def from_hparams(cls, hparams: Any) -> ModelSpec:
        return cls(
            image_shape=[int(d) for d in hparams["image_shape"]],
            class_names=[str(name) for name in hparams["class_names"]],
            pixel_max=float(hparams["pixel_max"]),
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_checkpoint_fits(
    spec: ModelSpec,
    manifest: Manifest,
    checkpoint: Path,
    path: Path,
    *,
    trained_on: str | None = None,
) -> None:
    """Fail, naming both sides, when the dataset is not the kind the checkpoint was trained on:
    another image shape, class list or pixel scale. Export and evaluation both check this."""
    expected = _describe(spec.image_shape, len(spec.class_names), spec.pixel_max)
    found = _describe(manifest.image_shape, manifest.num_classes, manifest.pixel_max)
    fix = f"use the dataset the model was trained on (data={trained_on or '<name>'})"
    if expected != found:
        raise DataError(
            f"checkpoint {checkpoint} expects {expected}, but dataset {path} has {found}; {fix}"
        )
    if spec.class_names != manifest.class_names:
        raise DataError(
            f"checkpoint {checkpoint} has classes {spec.class_names}, but dataset {path} has "
            f"{manifest.class_names}; {fix}"
        )


def _describe(image_shape: Sequence[int], num_classes: int, pixel_max: float) -> str:
    shape = "x".join(str(d) for d in image_shape)
    return f"{shape} images in {num_classes} classes on a 0-{pixel_max:g} scale"
