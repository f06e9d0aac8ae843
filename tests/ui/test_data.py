"""The app's data access, on real stores: registry, prediction log, loop history, bundles."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from opsloop.bundle import BUNDLE_JSON
from opsloop.config import DataConfig
from opsloop.corruption import get_corruption
from opsloop.data import dataset_dir, load_split
from opsloop.loop.history import History
from opsloop.registry.gate import rollback_champion
from opsloop.ui.data import (
    NoDataError,
    VersionBundles,
    accuracy_over_time,
    assess_log,
    chunks,
    compare_versions,
    drift_over_time,
    grey_image,
    least_confident,
    loop_timeline,
    promotion_event,
    read_log,
    read_loop_runs,
    read_models,
    read_samples,
    require_store,
    round_robin,
    sqlite_file,
)
from tests.ui.stores import MODEL, log_answers, make_registry

if TYPE_CHECKING:
    from opsloop.export import ExportResult


def test_a_missing_sqlite_store_is_no_data_and_is_not_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nothing.db'}"
    assert sqlite_file(url) == tmp_path / "nothing.db"
    assert sqlite_file("postgresql://u@db/log") is None
    with pytest.raises(NoDataError, match=r"no prediction log yet .*nothing\.db.*opsloop serve"):
        read_log(url, 10)
    with pytest.raises(NoDataError, match="opsloop loop run --once"):
        read_loop_runs(url)
    with pytest.raises(NoDataError, match="make run"):
        read_models(url, MODEL)
    require_store("postgresql://u@db/log", "log", "never raised for a server database")
    assert not (tmp_path / "nothing.db").exists()


def test_chunks_keep_a_large_enough_newest_remainder() -> None:
    assert [len(c) for c in chunks(10, 4)] == [4, 4, 2]  # 2 >= half a chunk: shown
    assert [len(c) for c in chunks(9, 4)] == [4, 4]  # a single newest answer is not a point
    assert [len(c) for c in chunks(9, 4, minimum=1)] == [4, 4, 1]
    assert chunks(0, 4) == []
    assert list(chunks(10, 4)[-1]) == [8, 9]


def test_round_robin_takes_every_class_before_repeating_one() -> None:
    labels = np.array([3, 3, 1, 3, 2, 1], dtype=np.int64)
    assert list(round_robin(labels, 4)) == [2, 4, 0, 5]
    assert len(round_robin(labels, 50)) == 6


def test_grey_image_is_sharp_upscaled_grey_levels() -> None:
    pixels = np.array([[[0.0, 16.0], [8.0, 4.0]]], dtype=np.float32)
    image = grey_image(pixels, pixel_max=16.0, scale=3)
    assert image.shape == (6, 6)
    assert image.dtype == np.uint8
    assert (image[:3, :3] == 0).all()
    assert (image[:3, 3:] == 255).all()
    assert image[3, 0] == 127


def test_the_registry_view_has_aliases_comparison_and_history(tmp_path: Path) -> None:
    uri = make_registry(tmp_path)
    view = read_models(uri, MODEL)
    assert [row.version for row in view.versions] == ["2", "1"]
    assert view.versions[1].aliases == ("champion",)
    assert view.versions[0].decision == "refused"
    assert view.versions[1].accuracy == pytest.approx(0.97)
    assert view.champion is not None
    assert view.challenger is not None
    assert (view.champion.version, view.challenger.version) == ("1", "2")
    assert view.champion.lineage["git_commit"] == "c0ffee1"
    table = compare_versions(view.champion, view.challenger)
    assert table[0] == ("eval/accuracy", pytest.approx(0.97), pytest.approx(0.91))
    assert [event.verdict for event in view.history] == ["refused", "promoted"]  # newest first
    rollback_champion(MODEL, "2", "live accuracy fell", uri, by="test")
    newest = read_models(uri, MODEL).history[0]
    assert (newest.verdict, newest.version, newest.champion_version) == ("rolled back", "2", "1")
    with pytest.raises(NoDataError, match="no registered model 'other'"):
        read_models(uri, "other")


def test_a_history_entry_is_read_tolerantly() -> None:
    event = promotion_event({"challenger_version": "4", "promoted": True, "forced": True})
    assert (event.version, event.verdict, event.timestamp, event.latency_ms) == (
        "4",
        "forced",
        0.0,
        None,
    )


def test_loop_runs_and_promotions_become_one_timeline(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    history = History(url)
    with pytest.raises(NoDataError, match="has no runs yet"):
        read_loop_runs(url)
    first = history.create("accuracy", "online accuracy 0.61 below 0.90", {"labelled": 80}, "x")
    history.update(
        first,
        state="succeeded",
        started_at=time.time(),
        finished_at=time.time() + 30,
        data_name="digits-production",
        data_hash="8db7babc85a6ffff",
        labels=538,
        model_version="2",
        decision="holdout accuracy 0.74 vs champion v1's 0.24",
        promoted=True,
    )
    failed = history.create("manual", "by hand", {}, "failed")
    history.update(failed, error="training crashed")
    history.dispose()
    runs = read_loop_runs(url)
    assert [run.id for run in runs] == [failed, first]  # newest first
    promotions = [
        promotion_event({"challenger_version": "2", "promoted": True, "at": "2026-01-01T00:00:00"}),
        promotion_event(
            {"challenger_version": "1", "champion_version": "2", "kind": "rollback", "at": "x"}
        ),
    ]
    events = loop_timeline(runs, promotions)
    kinds = [event.kind for event in events]
    assert kinds.count("promotion") == 1  # the loop's own promotion is not shown twice
    assert "rollback" in kinds
    assert "failure" in kinds
    assert any(e.kind == "data" and "8db7babc85a6" in e.title for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)


def renumbered(bundle: Path, target: Path, version: str) -> Path:
    """A copy of `bundle` that says it is `version` (the same model under another number)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / BUNDLE_JSON).read_text())
    (target / BUNDLE_JSON).write_text(json.dumps(manifest | {"model_version": version}))
    return target


@pytest.fixture(scope="module")
def world(
    bundle: ExportResult, trained: tuple[Path, DataConfig], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, VersionBundles, np.ndarray, np.ndarray]:
    """A log of 240 clean then 240 noisy answers of the trained bundle's version, all labelled,
    then 60 answers of a version no bundle exists for."""
    root = tmp_path_factory.mktemp("ui-log")
    url = f"sqlite:///{root / 'predictions.db'}"
    test = load_split(dataset_dir(trained[1]), "test")
    images, labels = test.images[:240], test.labels[:240]
    noisy = get_corruption("gaussian_noise")(images, 3, pixel_max=16.0, rng=0)
    log_answers(url, bundle.path, images, prefix="c", scratch=root, labels=labels)
    log_answers(url, bundle.path, noisy, prefix="n", scratch=root, labels=labels)
    other = renumbered(bundle.path, root / "other", "99")  # a version no reference is found for
    log_answers(url, other, images[:60], prefix="o", scratch=root)
    bundles = VersionBundles(bundle.path, MODEL, None, root / "cache")
    return url, bundles, images, labels


def test_drift_over_time_fires_on_the_shift_and_never_mixes_versions(
    world: tuple[str, VersionBundles, np.ndarray, np.ndarray],
) -> None:
    url, bundles, _, _ = world
    logged = read_log(url, 2000)
    assert len(logged) == 540
    points = drift_over_time(logged, bundles, window=120, alpha=0.05)
    windows = sorted({p.at for p in points})
    assert len(windows) == 4  # 480 answers of the bundle's version; v99 has no reference
    assert {p.model_version for p in points} == {bundles.served_version}
    drifted = {p.at for p in points if p.drift}
    assert drifted == set(windows[2:])  # the noisy half, and only it
    assert {p.detector for p in points} == {"image_stats", "embedding", "softmax"}


def test_accuracy_online_and_estimated_over_time(
    world: tuple[str, VersionBundles, np.ndarray, np.ndarray],
) -> None:
    url, bundles, _, _ = world
    logged = read_log(url, 2000)
    points = accuracy_over_time(logged, chunk=120, bundles=bundles)
    online = [p.accuracy for p in points if p.kind == "online"]
    estimated = [p for p in points if p.kind == "estimated"]
    assert len(online) == 4
    assert min(online[:2]) > max(online[2:])  # the noise costs accuracy
    assert len(estimated) == 4
    assert all(0.0 <= p.accuracy <= 1.0 for p in estimated)
    report = assess_log(logged, bundles)
    assert {(q.model_version, q.labelled) for q in report.versions} == {
        (bundles.served_version, 480),
        ("99", 0),
    }
    assert [e.model_version for e in report.estimates] == [bundles.served_version]


def test_least_confident_answers_come_first_with_their_labels(
    world: tuple[str, VersionBundles, np.ndarray, np.ndarray],
) -> None:
    logged = read_log(world[0], 2000)
    answers = least_confident(logged, 12)
    confidences = [a.confidence for a in answers]
    assert confidences == sorted(confidences)
    assert confidences[0] == pytest.approx(float(logged.probabilities.max(axis=1).min()))
    assert answers[0].image.shape == (64, 64)
    assert all(a.true_label is not None or a.model_version == "99" for a in answers)


def test_samples_are_labelled_held_out_digits_of_every_class(bundle: ExportResult) -> None:
    samples = read_samples(bundle.path, 10)
    assert len(samples) == 10
    assert sorted(samples.labels.tolist()) == list(range(10))
    assert samples.images.shape[1:] == (1, 8, 8)
    assert samples.pixel_max == 16.0
    with pytest.raises(NoDataError, match="upload an image instead"):
        read_samples(bundle.path.parent / "missing", 10)


def test_windows_whose_embeddings_another_model_wrote_are_not_judged(
    world: tuple[str, VersionBundles, np.ndarray, np.ndarray],
) -> None:
    url, bundles, _, _ = world
    logged = read_log(url, 2000)
    embeddings = logged.embeddings.copy()
    embeddings[:120] = np.nan  # what the read side leaves for rows of another embedding width
    points = drift_over_time(
        dataclasses.replace(logged, embeddings=embeddings), bundles, window=120, alpha=0.05
    )
    assert len({p.at for p in points}) == 3  # the first window is skipped, not misjudged
