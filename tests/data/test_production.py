"""The production source: the base dataset plus the labelled predictions the server logged."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from opsloop.data import load_split, prepare_dataset, read_manifest
from opsloop.data.production import production_examples
from opsloop.errors import DataError
from opsloop.predictions import ensure_schema, feedback, open_engine
from opsloop.serve.predlog import LogRecord, prediction_log
from tests.support import make_config


def log_answers(url: str, images: np.ndarray, *, start: float) -> list[str]:
    """One request per image, answered as class 0, one second apart from `start`."""
    ids = []
    with prediction_log(url, flush_interval_s=0.01) as log:
        for index, image in enumerate(images):
            request_id = f"r{index}"
            log.append(
                LogRecord(
                    request_id=request_id,
                    created_at=start + index,
                    endpoint="infer",
                    model_name="digits",
                    model_version="1",
                    inputs=image[None].astype(np.float32),
                    probabilities=np.eye(10, dtype=np.float32)[[0]],
                    embedding=np.zeros((1, 4), np.float32),
                    latency_ms=1.0,
                )
            )
            ids.append(request_id)
    return ids


def label(url: str, labels: dict[str, int]) -> None:
    engine = open_engine(url, create=True)
    ensure_schema(engine)
    with engine.begin() as connection:
        connection.execute(
            feedback.insert(),
            [
                {"request_id": rid, "item": 0, "label": value, "created_at": time.time()}
                for rid, value in labels.items()
            ],
        )
    engine.dispose()


def test_production_data_is_the_base_plus_labelled_answers_newest_held_out(
    workspace: Path,
) -> None:
    base = make_config(workspace).data
    prepare_dataset(base)
    base_test = load_split(Path(base.processed_dir) / "digits", "test")
    url = f"sqlite:///{workspace / 'predictions.db'}"
    # 40 production answers (test images rotated by 90 degrees), 30 labelled, one twice.
    images = np.rot90(base_test.images[:40], axes=(2, 3)).copy()
    ids = log_answers(url, images, start=1000.0)
    truth = {rid: int(base_test.labels[i]) for i, rid in enumerate(ids[:30])}
    label(url, truth)
    label(url, {ids[0]: truth[ids[0]]})
    cfg = make_config(
        workspace,
        "data=production",
        f"data.predlog_url={url}",
        "data.min_labels=20",
        "data.holdout_fraction=0.2",
    ).data
    result = prepare_dataset(cfg)
    manifest = read_manifest(result.path)
    base_manifest = read_manifest(Path(base.processed_dir) / "digits")
    assert manifest.counts["test"] == 6  # the newest 20% of the 30 labelled answers
    pool = manifest.counts["train"] + manifest.counts["val"]
    assert pool == base_manifest.counts["train"] + base_manifest.counts["val"] + 24
    test = load_split(result.path, "test")
    assert np.array_equal(test.images, images[24:30])  # as the model saw them, newest last
    assert list(test.labels) == [truth[rid] for rid in ids[24:30]]
    assert "30 labelled predictions" in manifest.source
    again = prepare_dataset(cfg)
    assert not again.written  # the same log gives the same version


def test_too_few_labels_is_a_clear_error(workspace: Path) -> None:
    base = make_config(workspace).data
    prepare_dataset(base)
    url = f"sqlite:///{workspace / 'predictions.db'}"
    log_answers(url, load_split(Path(base.processed_dir) / "digits", "test").images[:3], start=0)
    cfg = make_config(workspace, "data=production", f"data.predlog_url={url}").data
    with pytest.raises(DataError, match=r"0 distinct labelled predictions .* than data\.min"):
        prepare_dataset(cfg)


def test_duplicates_and_other_shapes_are_dropped() -> None:
    image = np.full((1, 8, 8), 3.0, np.float32)
    other = np.zeros((1, 28, 28), np.float32)
    images, labels, times = production_examples(
        [image, image, image, other],
        np.array([1, 1, 2, 1]),
        np.array([1.0, 2.0, 3.0, 4.0]),
        [1, 8, 8],
        16.0,
    )
    assert labels.tolist() == [1, 2]  # the same input with another label is another example
    assert times.tolist() == [1.0, 3.0]
    assert images.dtype == np.uint8


def test_a_pinned_snapshot_ignores_later_labels_and_reads_the_same_twice(
    workspace: Path,
) -> None:
    base = make_config(workspace).data
    prepare_dataset(base)
    base_test = load_split(Path(base.processed_dir) / "digits", "test")
    url = f"sqlite:///{workspace / 'predictions.db'}"
    ids = log_answers(url, base_test.images[:40], start=1000.0)
    label(url, {rid: int(base_test.labels[i]) for i, rid in enumerate(ids[:30])})
    pinned = time.time()
    time.sleep(0.01)
    label(url, {rid: int(base_test.labels[i]) for i, rid in enumerate(ids[30:], start=30)})
    label(url, {ids[0]: (int(base_test.labels[0]) + 1) % 10})  # a correction, after the pin
    options = ["data=production", f"data.predlog_url={url}", "data.min_labels=20"]
    snapshot = make_config(workspace, *options, f"data.labels_until={pinned}").data
    first = prepare_dataset(snapshot)
    later = make_config(workspace, *options).data
    assert (
        sum(read_manifest(first.path).counts.values())
        - sum(
            read_manifest(Path(base.processed_dir) / "digits").counts[s] for s in ("train", "val")
        )
        == 30
    )  # only the labels that had arrived by the pin
    again = prepare_dataset(snapshot)
    assert again.content_hash == first.content_hash  # the same version, however late
    assert not again.written
    everything = prepare_dataset(later)
    assert everything.content_hash != first.content_hash
