"""Evaluation: metrics in range, the report files, seeded robustness, mismatches and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from opsloop.cli import main
from opsloop.config import DataConfig
from opsloop.corruption import CORRUPTIONS, SEVERITIES
from opsloop.data import dataset_dir, prepare_dataset, read_manifest
from opsloop.errors import CheckpointError, DataError
from opsloop.evaluate import (
    EvalResult,
    calibration_bins,
    confusion_matrix,
    evaluate_model,
    per_class_metrics,
    warn_if_other_version,
)
from opsloop.model import ModelSpec, check_checkpoint_fits
from tests.support import CONFIG_DIR, make_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = {
    "metrics.json",
    "per_class.csv",
    "robustness.md",
    "confusion_matrix.png",
    "reliability_diagram.png",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def digits(trained: tuple[Path, DataConfig]) -> DataConfig:
    """The digits dataset the shared session checkpoint was trained on."""
    return trained[1]


@pytest.fixture(scope="module")
def checkpoint(trained: tuple[Path, DataConfig]) -> Path:
    """A small CNN trained for a few epochs (tests/conftest.py), independent of `train`."""
    return trained[0]


@pytest.fixture(scope="module")
def result(root: Path, checkpoint: Path, digits: DataConfig) -> EvalResult:
    return evaluate_model(checkpoint, digits, out_dir=root / "report", seed=3)


def test_metrics_are_in_range_and_well_above_chance(result: EvalResult) -> None:
    metrics = result.metrics
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "ece"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["accuracy"] > 0.6  # chance is 0.1
    assert metrics["macro_f1"] > 0.5
    assert 0.0 < metrics["nll"] < np.log(10)  # better than a uniform guess


def test_per_class_rows_cover_every_class(result: EvalResult, digits: DataConfig) -> None:
    manifest = read_manifest(dataset_dir(digits))
    assert [row["name"] for row in result.per_class] == manifest.class_names
    assert sum(row["support"] for row in result.per_class) == manifest.counts["test"]
    for row in result.per_class:
        for key in ("precision", "recall", "f1"):
            assert 0.0 <= row[key] <= 1.0


def test_report_files_are_written(result: EvalResult) -> None:
    assert {path.name for path in result.files} == REPORT_FILES
    assert {path.name for path in result.out_dir.iterdir()} == REPORT_FILES  # no temp files left
    for name in ("confusion_matrix.png", "reliability_diagram.png"):
        payload = (result.out_dir / name).read_bytes()
        assert payload.startswith(PNG_MAGIC)
        assert len(payload) > 1000


def test_metrics_json_records_lineage_and_tables(
    result: EvalResult, checkpoint: Path, digits: DataConfig
) -> None:
    report = json.loads((result.out_dir / "metrics.json").read_text())
    assert report["checkpoint"] == str(checkpoint)
    assert report["dataset"]["content_hash"] == read_manifest(dataset_dir(digits)).content_hash
    assert report["dataset"]["split"] == "test"
    assert report["metrics"] == pytest.approx(result.metrics)
    assert report["per_class"] == result.per_class
    assert report["robustness"] == result.robustness
    assert len(report["calibration"]["count"]) == 15
    assert sum(report["calibration"]["count"]) == report["dataset"]["num_samples"]
    assert np.trace(np.array(report["confusion_matrix"])) > 0


def test_per_class_csv_and_robustness_markdown(result: EvalResult) -> None:
    csv_lines = (result.out_dir / "per_class.csv").read_text().splitlines()
    assert csv_lines[0] == "name,precision,recall,f1,support"
    assert len(csv_lines) == 11
    markdown = (result.out_dir / "robustness.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(CORRUPTIONS) * len(SEVERITIES)  # header + one row each
    assert "| gaussian_noise | 3 | noise std / pixel_max = 0.4 |" in markdown


def test_robustness_covers_every_corruption_and_severity(result: EvalResult) -> None:
    pairs = [(row["corruption"], row["severity"]) for row in result.robustness]
    assert pairs == [(name, s) for name in CORRUPTIONS for s in SEVERITIES]
    clean = result.metrics["accuracy"]
    for row in result.robustness:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["delta"] == pytest.approx(row["accuracy"] - clean)
    strongest_noise = next(
        row
        for row in result.robustness
        if row["corruption"] == "gaussian_noise" and row["severity"] == 3
    )
    assert strongest_noise["accuracy"] < clean
    assert result.worst_corruption["accuracy"] == result.metrics["corrupted_accuracy_worst"]


def test_same_seed_same_tables_other_seed_differs(
    root: Path, checkpoint: Path, digits: DataConfig, result: EvalResult
) -> None:
    again = evaluate_model(checkpoint, digits, out_dir=root / "again", seed=3)
    assert again.robustness == result.robustness
    assert again.metrics == result.metrics
    assert (root / "again" / "robustness.md").read_text() == (
        result.out_dir / "robustness.md"
    ).read_text()
    other = evaluate_model(checkpoint, digits, out_dir=root / "other", seed=4)
    assert other.metrics["accuracy"] == result.metrics["accuracy"]  # clean data is not seeded
    assert other.robustness != result.robustness


def test_metric_helpers_agree_with_sklearn_and_torchmetrics() -> None:
    from sklearn.metrics import precision_recall_fscore_support
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + 2.0 * np.eye(4)[labels]
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    predictions = log_probs.argmax(axis=1)
    rows = per_class_metrics(confusion_matrix(labels, predictions, 4), ["a", "b", "c", "d"])
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(4), zero_division=0
    )
    np.testing.assert_allclose([r["precision"] for r in rows], precision)
    np.testing.assert_allclose([r["recall"] for r in rows], recall)
    np.testing.assert_allclose([r["f1"] for r in rows], f1)
    assert [r["support"] for r in rows] == support.tolist()
    expected_ece = multiclass_calibration_error(
        torch.from_numpy(np.exp(log_probs)), torch.from_numpy(labels), num_classes=4, n_bins=15
    )
    assert calibration_bins(log_probs, labels, n_bins=15).ece == pytest.approx(
        float(expected_ece), abs=1e-6
    )


def test_a_class_never_predicted_scores_zero_not_nan() -> None:
    rows = per_class_metrics(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 3), "abc")
    assert rows[1] == {"name": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rows[2]["support"] == 0


def test_a_dataset_of_another_shape_is_refused(
    root: Path, checkpoint: Path, tmp_path: Path
) -> None:
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pictures" / name).mkdir(parents=True)
        for index in range(8):
            pixels = np.full((12, 12), 30 * index, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pictures" / name / f"{index}.png")
    folder = make_config(
        tmp_path, "data=imagefolder", f"data.root={tmp_path / 'pictures'}", "data.image_size=12"
    ).data
    prepare_dataset(folder)
    with pytest.raises(DataError, match=r"expects 1x8x8 images in 10 classes.*has 1x12x12 images"):
        evaluate_model(checkpoint, folder, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_class_names_are_refused(
    checkpoint: Path, digits: DataConfig, tmp_path: Path
) -> None:
    letters = replace(
        digits, name="letters", processed_dir=str(tmp_path), class_names=list("abcdefghij")
    )
    prepare_dataset(letters)
    with pytest.raises(DataError, match=r"has classes \['0'.*but dataset .* has \['a'"):
        evaluate_model(checkpoint, letters, out_dir=tmp_path / "out")


def test_lineage_names_the_training_data_in_errors_and_warnings(
    digits: DataConfig, caplog: pytest.LogCaptureFixture
) -> None:
    path = dataset_dir(digits)
    manifest = read_manifest(path)
    spec = ModelSpec([1, 28, 28], manifest.class_names, 255.0)
    with pytest.raises(DataError, match=r"\(data=mnist\)$"):
        check_checkpoint_fits(spec, manifest, Path("m.ckpt"), path, trained_on="mnist")
    warn_if_other_version({"dataset_hash": manifest.content_hash}, manifest, Path("m.ckpt"))
    assert not caplog.records
    other = {"dataset_name": "digits", "dataset_hash": "f" * 64}
    warn_if_other_version(other, manifest, Path("m.ckpt"))
    assert "another version of the data" in caplog.text


def test_another_pixel_scale_alone_is_refused(digits: DataConfig) -> None:
    """Export and evaluation share this check; the export's old copy ignored the pixel scale."""
    path = dataset_dir(digits)
    manifest = read_manifest(path)
    same_but_scale = ModelSpec(list(manifest.image_shape), manifest.class_names, 255.0)
    with pytest.raises(DataError, match=r"on a 0-255 scale, but dataset .* on a 0-16 scale"):
        check_checkpoint_fits(same_but_scale, manifest, Path("m.ckpt"), path)
    check_checkpoint_fits(
        ModelSpec(list(manifest.image_shape), manifest.class_names, manifest.pixel_max),
        manifest,
        Path("m.ckpt"),
        path,
    )


def test_corrupt_checkpoint_is_a_checkpoint_error(digits: DataConfig, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*broken\.ckpt"):
        evaluate_model(broken, digits, out_dir=tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_model(tmp_path / "missing.ckpt", digits, out_dir=tmp_path / "out")


def test_a_missing_dataset_says_how_to_make_it(checkpoint: Path, tmp_path: Path) -> None:
    missing = make_config(tmp_path).data
    with pytest.raises(DataError, match="run `opsloop data"):
        evaluate_model(checkpoint, missing, out_dir=tmp_path / "out")


def cli_args(root: Path, data: DataConfig, *extra: str) -> list[str]:
    return ["evaluate", *extra, f"data.processed_dir={data.processed_dir}", f"workspace={root}"]


def test_cli_evaluates_a_checkpoint_into_the_default_dir(
    root: Path,
    checkpoint: Path,
    digits: DataConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))
    assert main(cli_args(root, digits, "--checkpoint", str(checkpoint))) == 0
    out_dir = root / "outputs" / "eval" / checkpoint.stem
    assert {path.name for path in out_dir.iterdir()} == REPORT_FILES
    printed = capsys.readouterr().out
    for label in ("accuracy", "macro-F1", "ECE", "worst corruption", str(out_dir)):
        assert label in printed.replace("\n", "")


def test_cli_writes_where_told(
    root: Path, checkpoint: Path, digits: DataConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))
    out_dir = root / "chosen"
    assert main(cli_args(root, digits, "--checkpoint", str(checkpoint), "--out", str(out_dir))) == 0
    assert json.loads((out_dir / "metrics.json").read_text())["metrics"]["accuracy"] > 0.6


@pytest.mark.parametrize("options", [[], ["--checkpoint", "a.ckpt", "--run-id", "abc"]])
def test_cli_needs_exactly_one_source(
    options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: give exactly one of --run-id or --checkpoint (see 'opsloop evaluate --help')"
    )


def test_cli_runtime_error_is_one_line(
    root: Path,
    digits: DataConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00" * 10)
    assert main(cli_args(root, digits, "--checkpoint", str(broken))) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: cannot load checkpoint")


@pytest.mark.slow
def test_cli_evaluates_a_tracked_run_and_logs_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from opsloop.train import train_model

    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))
    monkeypatch.delenv("OPSLOOP_TRACKING_URI", raising=False)
    # The evaluation needs only the run's checkpoint: skip logging the model, train one epoch.
    overrides = [
        "experiment=tiny",
        f"workspace={tmp_path}",
        "trainer.max_epochs=1",
        "logger.log_model=false",
    ]
    cfg = make_config(tmp_path, *overrides)
    prepare_dataset(cfg.data)
    trained = train_model(cfg)
    assert trained.run_id is not None
    assert trained.tracking_uri is not None

    args = ["evaluate", "--run-id", trained.run_id, *overrides]
    assert main([*args, f"data.processed_dir={tmp_path / 'processed'}"]) == 0
    out_dir = tmp_path / "outputs" / "eval" / trained.run_id
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["checkpoint"] == f"runs:/{trained.run_id}/checkpoints/best.ckpt"
    assert report["trained_on"]["content_hash"] == report["dataset"]["content_hash"]
    assert trained.run_id in capsys.readouterr().out

    client = MlflowClient(trained.tracking_uri)
    logged = {item.path for item in client.list_artifacts(trained.run_id, "evaluation")}
    assert logged == {f"evaluation/{name}" for name in REPORT_FILES}
    run_metrics = client.get_run(trained.run_id).data.metrics
    for key, value in report["metrics"].items():
        assert run_metrics[f"eval/{key}"] == pytest.approx(value)
