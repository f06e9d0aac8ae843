"""The CNN: shapes for any image size, in-graph normalisation, learning, and safe loading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from opsloop.config import ModelConfig, OptimConfig
from opsloop.errors import CheckpointError, ConfigError
from opsloop.model import (
    ConvNet,
    ImageClassifier,
    Normalize,
    build_model,
    load_classifier,
    make_optimizer,
    make_scheduler,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids oversubscribing a small, busy CPU (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def net_for(shape: tuple[int, int, int], classes: int, **kwargs: int | float) -> ConvNet:
    channels = shape[0]
    return ConvNet(
        image_shape=shape,
        num_classes=classes,
        pixel_mean=[0.5] * channels,
        pixel_std=[0.25] * channels,
        **kwargs,  # type: ignore[arg-type]
    )


def classifier_for(shape: tuple[int, int, int] = (1, 8, 8), classes: int = 3) -> ImageClassifier:
    return ImageClassifier.for_dataset(
        ModelConfig(channels=4, depth=1, hidden=8, dropout=0.0),
        OptimConfig(lr=0.01, scheduler="none"),
        image_shape=shape,
        class_names=[f"c{i}" for i in range(classes)],
        pixel_mean=[0.5] * shape[0],
        pixel_std=[0.25] * shape[0],
        pixel_max=1.0,
    )


@pytest.mark.parametrize(
    ("shape", "classes", "depth"),
    [
        ((1, 8, 8), 10, 2),
        ((1, 28, 28), 10, 3),
        ((3, 32, 32), 5, 2),
        ((1, 5, 7), 2, 3),
        ((3, 1, 1), 4, 1),
    ],
)
def test_logits_and_embedding_shapes(shape: tuple[int, int, int], classes: int, depth: int) -> None:
    net = net_for(shape, classes, channels=4, depth=depth, hidden=12).eval()
    images = torch.rand(3, *shape)
    logits, embedding = net.forward_with_embedding(images)
    assert logits.shape == (3, classes)
    assert embedding.shape == (3, 12)
    assert torch.equal(net(images), logits)
    assert torch.isfinite(logits).all()


def test_normalisation_is_in_the_graph_as_buffers() -> None:
    norm = Normalize([1.0, 2.0, 3.0], [2.0, 0.0, 4.0])
    assert {"mean", "std"} <= dict(norm.named_buffers()).keys()
    assert norm.std.flatten().tolist()[1] == pytest.approx(1e-6)  # a constant channel
    image = torch.tensor([3.0, 2.0, 7.0]).view(1, 3, 1, 1)
    assert norm(image).flatten().tolist() == pytest.approx([1.0, 0.0, 1.0])
    net = net_for((1, 8, 8), 10)
    assert {"normalize.mean", "normalize.std"} <= net.state_dict().keys()


def test_one_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    net = net_for((1, 8, 8), 4, channels=4, depth=1, hidden=8, dropout=0.0)
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    before = loss_fn(net(images), labels)
    before.backward()
    optimizer.step()
    after = loss_fn(net(images), labels)
    assert after.item() < before.item()


def test_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    net = net_for((1, 8, 8), 4, channels=8, depth=1, hidden=16, dropout=0.0)
    images, labels = torch.rand(12, 1, 8, 8), torch.arange(12) % 4
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(60):
        optimizer.zero_grad()
        loss_fn(net(images), labels).backward()
        optimizer.step()
    net.eval()
    accuracy = (net(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy == 1.0


def test_build_model_rejects_unknown_name_and_single_class() -> None:
    with pytest.raises(ConfigError, match=r"model.name='vit'"):
        build_model(
            ModelConfig(name="vit"),
            image_shape=(1, 8, 8),
            num_classes=10,
            pixel_mean=[0.0],
            pixel_std=[1.0],
        )
    with pytest.raises(ConfigError, match=r"at least 2 classes"):
        net_for((1, 8, 8), 1)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizers(optimizer: str) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    made = make_optimizer(OptimConfig(optimizer=optimizer, lr=0.5), params)
    assert made.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "step"])
def test_schedulers_are_per_step(scheduler: str) -> None:
    class Steps:
        estimated_stepping_batches = 30

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    made = make_scheduler(OptimConfig(scheduler=scheduler), optimizer, Steps())  # type: ignore[arg-type]
    assert made is not None
    assert made["interval"] == "step"


def test_hyperparameters_are_plain_and_kept_from_the_logger() -> None:
    classifier = classifier_for()
    assert classifier.hparams["class_names"] == ["c0", "c1", "c2"]
    assert classifier.hparams["model"]["channels"] == 4
    assert classifier._log_hyperparams is False  # training logs the whole config itself


def test_checkpoint_round_trip_and_bad_files(tmp_path: Path) -> None:
    classifier = classifier_for()
    trainer = L.Trainer(
        max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.strategy.connect(classifier)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_classifier(path)
    assert not loaded.training
    images = torch.rand(2, 1, 8, 8)
    classifier.eval()
    assert torch.allclose(loaded(images), classifier(images))
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_classifier(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint"):
        load_classifier(garbage)
