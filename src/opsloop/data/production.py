"""The production source: a base dataset plus the labelled predictions the server logged.

`opsloop data data=production` (what the loop retrains on) reads the prediction log joined with
the labels posted to `/feedback`, keeps every labelled answer exactly as the model saw it (the
logged input), drops duplicates, and returns the base dataset's train and val images plus the
older production examples as the pool to split, with the newest `data.holdout_fraction` of the
production examples as the test split: the gate then judges a retrained model on the world as it
is now. The base dataset's own test split is left out entirely, so it can still judge that the
old world was not traded away.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from opsloop.config import DataConfig
from opsloop.data.raw import RawDataset
from opsloop.errors import ConfigError, DataError, redact_url

logger = logging.getLogger(__name__)


def load_production_dataset(cfg: DataConfig) -> RawDataset:
    """The base's train+val and the older production examples; the newest ones as the test."""
    from opsloop.data.prepare import load_split, read_manifest
    from opsloop.predictions import CANARY_ROLE, CHAMPION_ROLE, default_log_url, read_predictions

    if not cfg.base:
        raise ConfigError(
            "data.base is not set; name the processed dataset production data extends, e.g. "
            "data.base=digits"
        )
    base_dir = Path(cfg.base_dir or cfg.processed_dir) / cfg.base
    manifest = read_manifest(base_dir)
    url = cfg.predlog_url or default_log_url()
    # Shadow answers repeat the same inputs: champion and canary rows hold each input once.
    logged = read_predictions(
        url, roles=[CHAMPION_ROLE, CANARY_ROLE], labels_until=cfg.labels_until
    )
    logged = logged.where(logged.labelled)
    images, labels, created = production_examples(
        logged.inputs,
        logged.true_labels,
        logged.created_at,
        manifest.image_shape,
        manifest.pixel_max,
    )
    if len(labels) < cfg.min_labels:
        raise DataError(
            f"{redact_url(url)} holds {len(labels)} distinct labelled predictions of "
            f"{cfg.base}'s shape, fewer than data.min_labels={cfg.min_labels}; post labels to "
            "/feedback or lower data.min_labels"
        )
    order = np.argsort(created, kind="stable")
    held = max(1, round(len(order) * cfg.holdout_fraction))
    older, newest = order[:-held], order[-held:]
    train, val = load_split(base_dir, "train"), load_split(base_dir, "val")
    logger.info(
        "production data: %s (%d train+val) + %d labelled predictions, newest %d held out",
        cfg.base,
        len(train.labels) + len(val.labels),
        len(older),
        len(newest),
    )
    return RawDataset(
        images=np.concatenate([train.images, val.images, images[older]]),
        labels=np.concatenate([train.labels, val.labels, labels[older]]),
        class_names=list(manifest.class_names),
        source=f"{cfg.base}@{manifest.content_hash[:12]} + {len(labels)} labelled predictions "
        f"of {redact_url(url)}",
        pixel_max=manifest.pixel_max,
        test_images=images[newest],
        test_labels=labels[newest],
    )


def production_examples(
    inputs: list[npt.NDArray[np.float32]],
    labels: npt.NDArray[np.int64],
    created_at: npt.NDArray[np.float64],
    image_shape: list[int],
    pixel_max: float,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The logged inputs of the base's shape as uint8 on its pixel scale, each (input, label)
    pair once (its first appearance), with when it was answered."""
    shape = tuple(image_shape)
    seen: set[bytes] = set()
    keep_images, keep_labels, keep_times = [], [], []
    for image, label, at in zip(inputs, labels, created_at, strict=True):
        if image.shape != shape:
            continue  # another model's input: not part of this dataset
        pixels = np.clip(np.rint(image), 0, pixel_max).astype(np.uint8)
        key = hashlib.sha256(pixels.tobytes() + int(label).to_bytes(8, "little")).digest()
        if key in seen:
            continue
        seen.add(key)
        keep_images.append(pixels)
        keep_labels.append(int(label))
        keep_times.append(float(at))
    if not keep_images:
        return (
            np.zeros((0, *shape), np.uint8),
            np.zeros(0, np.int64),
            np.zeros(0, np.float64),
        )
    return np.stack(keep_images), np.array(keep_labels, np.int64), np.array(keep_times)
