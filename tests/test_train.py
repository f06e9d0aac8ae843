"""Training: checkpoints, a real MLflow run with everything it must record, resume,
reproducibility, the null and W&B trackers, and failing fast on bad input."""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from opsloop.cli import main
from opsloop.config import OpsloopConfig, config_hash, config_to_yaml, parse_devices
from opsloop.data import read_manifest
from opsloop.errors import CheckpointError, ConfigError, DataError, TrackingError
from opsloop.model import ImageClassifier
from opsloop.tracking import TRACKING_URI_ENV, artifact_root, create_run
from opsloop.train import (
    CHECKPOINT_LINEAGE_KEY,
    TrainResult,
    batch_count,
    flatten_config,
    git_state,
    train_model,
)
from tests.support import CONFIG_DIR, prepare_digits, tiny_train_config

LINEAGE_TAGS = {
    "git_commit",
    "git_dirty",
    "dataset_name",
    "dataset_hash",
    "config_hash",
    "seed",
    "opsloop_version",
    "python_version",
    "run_dir",
}
VERSION_TAGS = {f"version.{name}" for name in ("torch", "lightning", "mlflow", "numpy", "opsloop")}


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.delenv("OPSLOOP_RUN_DIR", raising=False)
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits prepared once for the module; training only reads it."""
    root = tmp_path_factory.mktemp("processed")
    prepare_digits(root)
    return root


@pytest.fixture(scope="module")
def tracked(
    tmp_path_factory: pytest.TempPathFactory, processed: Path
) -> tuple[OpsloopConfig, TrainResult]:
    """One tiny training tracked in a real SQLite store, model and profiler report included."""
    workspace = tmp_path_factory.mktemp("tracked")
    cfg = tiny_train_config(
        workspace, processed, "logger.log_model=true", "trainer.profiler=simple"
    )
    with pytest.MonkeyPatch.context() as patch:  # runs before the function-scoped env fixture
        patch.delenv(TRACKING_URI_ENV, raising=False)
        patch.delenv("OPSLOOP_RUN_DIR", raising=False)
        patch.chdir(workspace)  # MLflow's habit is ./mlruns: it must not appear here
        return cfg, train_model(cfg)


def client_for(result: TrainResult) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(result.tracking_uri)


def weights_hash(checkpoint: Path) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- one tracked run ---------------------------------------------------------------------


def test_run_dir_holds_config_checkpoints_and_profile(
    tracked: tuple[OpsloopConfig, TrainResult],
) -> None:
    cfg, result = tracked
    workspace = Path(cfg.workspace)
    assert result.run_dir.parent == (workspace / "outputs").resolve()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{6}", result.run_dir.name)
    assert (result.run_dir / "config.yaml").read_text() == config_to_yaml(cfg)
    assert result.best_checkpoint == result.run_dir / "checkpoints" / "best.ckpt"
    assert result.last_checkpoint == result.run_dir / "checkpoints" / "last.ckpt"
    assert result.best_checkpoint.is_file()
    assert result.last_checkpoint.is_file()
    assert "FIT Profiler Report" in (result.run_dir / "profiler" / "fit-profile.txt").read_text()
    assert result.seconds > 0
    assert 0.0 <= result.metrics["test/acc"] <= 1.0
    assert set(result.metrics) == {"test/loss", "test/acc", "test/f1", "val/loss_best"}


def test_the_store_and_artifacts_live_in_the_workspace(
    tracked: tuple[OpsloopConfig, TrainResult],
) -> None:
    cfg, result = tracked
    workspace = Path(cfg.workspace).resolve()
    assert result.tracking_uri == f"sqlite:///{workspace}/mlflow.db"
    assert (workspace / "mlflow.db").is_file()
    assert (artifact_root(workspace) / str(result.run_id)).is_dir()
    assert not (workspace / "mlruns").exists()  # the cwd while it trained


def test_exactly_one_finished_run_with_the_flattened_config_as_params(
    tracked: tuple[OpsloopConfig, TrainResult],
) -> None:
    cfg, result = tracked
    client = client_for(result)
    experiment = client.get_experiment_by_name(cfg.logger.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_config(cfg)
    assert run.data.params["model.channels"] == str(cfg.model.channels)
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)


def test_lineage_and_versions_are_tags(tracked: tuple[OpsloopConfig, TrainResult]) -> None:
    cfg, result = tracked
    tags = client_for(result).get_run(result.run_id).data.tags
    assert set(tags) >= LINEAGE_TAGS | VERSION_TAGS
    manifest = read_manifest(Path(cfg.data.processed_dir) / "digits")
    assert tags["dataset_hash"] == manifest.content_hash
    assert tags["dataset_name"] == "digits"
    assert tags["config_hash"] == config_hash(cfg)
    assert tags["seed"] == str(cfg.seed)
    assert tags["opsloop_version"] == tags["version.opsloop"]
    assert tags["version.torch"] == torch.__version__.split("+")[0]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    assert tags["git_dirty"] in {"true", "false", "unknown"}
    assert tags["run_dir"] == str(result.run_dir)
    assert "mlflow.parentRunId" not in tags


def test_lineage_is_queryable_with_search_runs(tracked: tuple[OpsloopConfig, TrainResult]) -> None:
    import mlflow

    cfg, result = tracked
    mlflow.set_tracking_uri(result.tracking_uri)
    manifest = read_manifest(Path(cfg.data.processed_dir) / "digits")
    found = mlflow.search_runs(
        experiment_names=[cfg.logger.experiment],
        filter_string=f"tags.dataset_hash = '{manifest.content_hash}'",
        output_format="list",
    )
    assert [run.info.run_id for run in found] == [result.run_id]


def test_metrics_per_epoch_and_final(tracked: tuple[OpsloopConfig, TrainResult]) -> None:
    cfg, result = tracked
    client = client_for(result)
    run = client.get_run(result.run_id)
    for key in ("train/loss_epoch", "val/loss", "val/acc", "val/f1", "lr-AdamW"):
        history = client.get_metric_history(result.run_id, key)
        assert len(history) == cfg.trainer.max_epochs, key
    for key, value in result.metrics.items():
        assert run.data.metrics[key] == pytest.approx(value)


def test_artifacts_config_checkpoint_profile(tracked: tuple[OpsloopConfig, TrainResult]) -> None:
    cfg, result = tracked
    client = client_for(result)

    def paths(folder: str) -> list[str]:
        return [a.path for a in client.list_artifacts(result.run_id, folder)]

    assert paths("config") == ["config/config.yaml"]
    assert paths("checkpoints") == ["checkpoints/best.ckpt"]
    assert paths("profiler") == ["profiler/fit-profile.txt", "profiler/test-profile.txt"]
    local = artifact_root(Path(cfg.workspace)) / str(result.run_id) / "artifacts"
    assert (local / "config" / "config.yaml").read_text() == config_to_yaml(cfg)
    assert (local / "checkpoints" / "best.ckpt").read_bytes() == result.best_checkpoint.read_bytes()


def test_model_is_logged_with_a_raw_pixel_signature(
    tracked: tuple[OpsloopConfig, TrainResult],
) -> None:
    import mlflow.pyfunc
    import numpy as np

    _, result = tracked
    run = client_for(result).get_run(result.run_id)
    [output] = run.outputs.model_outputs
    model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    inputs = model.metadata.get_input_schema().inputs
    assert inputs[0].type == np.dtype(np.float32)
    assert tuple(inputs[0].shape) == (-1, 1, 8, 8)
    images = np.random.default_rng(0).uniform(0, 16, size=(5, 1, 8, 8)).astype(np.float32)
    assert model.predict(images).shape == (5, 10)


def test_checkpoints_describe_their_run(tracked: tuple[OpsloopConfig, TrainResult]) -> None:
    _, result = tracked
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    lineage = checkpoint[CHECKPOINT_LINEAGE_KEY]
    assert lineage["run_id"] == result.run_id
    assert lineage["dataset_name"] == "digits"
    assert checkpoint["hyper_parameters"]["class_names"] == [str(i) for i in range(10)]


def test_resume_continues_from_the_saved_epoch(
    tracked: tuple[OpsloopConfig, TrainResult], processed: Path, workspace: Path
) -> None:
    cfg, first = tracked
    saved = torch.load(first.last_checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == cfg.trainer.max_epochs - 1
    more = cfg.trainer.max_epochs + 1
    resumed = train_model(
        tiny_train_config(
            workspace,
            processed,
            "logger=none",
            f"ckpt_path={first.last_checkpoint}",
            f"trainer.max_epochs={more}",
        )
    )
    after = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=True)
    assert after["epoch"] == more - 1
    steps_per_epoch = saved["global_step"] // cfg.trainer.max_epochs
    assert after["global_step"] == saved["global_step"] + steps_per_epoch


def test_child_run_of_a_parent(tracked: tuple[OpsloopConfig, TrainResult], processed: Path) -> None:
    cfg, first = tracked
    workspace = Path(cfg.workspace)
    parent = create_run(str(first.tracking_uri), workspace, experiment="sweeps")
    child = train_model(
        tiny_train_config(workspace, processed, "logger.experiment=sweeps", "+logger.tags.trial=3"),
        parent_run_id=parent,
    )
    tags = client_for(child).get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["trial"] == "3"


# --- trackers -----------------------------------------------------------------------------


def test_same_seed_same_metrics_and_weights_without_tracking(
    processed: Path, tmp_path: Path
) -> None:
    results = []
    for name in ("a", "b"):
        workspace = tmp_path / name
        results.append(train_model(tiny_train_config(workspace, processed, "logger=none")))
        assert not (workspace / "mlflow.db").exists()
    first, second = results
    assert first.run_id is None
    assert first.tracking_uri is None
    assert first.metrics == second.metrics
    assert weights_hash(first.best_checkpoint) == weights_hash(second.best_checkpoint)


@pytest.mark.slow
def test_wandb_offline_writes_a_local_run(
    processed: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(workspace))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    result = train_model(tiny_train_config(workspace, processed, "logger=wandb"))
    assert result.run_id
    runs = list((workspace / "wandb").glob(f"offline-run-*-{result.run_id}"))
    assert len(runs) == 1
    assert any(runs[0].glob("*.wandb"))
    assert not (workspace / "mlflow.db").exists()


# --- failing fast -------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_tracking_server_fails_before_writing(
    processed: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv(TRACKING_URI_ENV, uri)
    with pytest.raises(TrackingError, match=re.escape(uri)):
        train_model(tiny_train_config(workspace, processed))
    assert not (workspace / "outputs").exists()


def test_missing_data_names_the_command(workspace: Path) -> None:
    cfg = tiny_train_config(workspace, workspace / "nothing-here")
    with pytest.raises(DataError, match=r"opsloop data data=digits"):
        train_model(cfg)
    assert not (workspace / "outputs").exists()


def test_corrupt_resume_checkpoint(processed: Path, workspace: Path) -> None:
    bad = workspace / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    cfg = tiny_train_config(workspace, processed, "logger=none", f"ckpt_path={bad}")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*bad\.ckpt") as info:
        train_model(cfg)
    assert "\n" not in str(info.value)
    assert not (workspace / "outputs").exists()


def test_resume_checkpoint_of_another_shape(processed: Path, workspace: Path) -> None:
    cfg = tiny_train_config(workspace, processed, "logger=none")
    manifest = read_manifest(processed / "digits")
    other_model = type(cfg.model)(channels=4, depth=1, hidden=16)
    other = ImageClassifier.for_dataset(
        other_model,
        cfg.optim,
        image_shape=manifest.image_shape,
        class_names=manifest.class_names,
        pixel_mean=manifest.pixel_mean,
        pixel_std=manifest.pixel_std,
        pixel_max=manifest.pixel_max,
    )
    foreign = workspace / "foreign.ckpt"
    torch.save({"state_dict": other.state_dict()}, foreign)
    cfg.ckpt_path = str(foreign)
    with pytest.raises(CheckpointError, match=r"another model shape \(net\.") as info:
        train_model(cfg)
    assert "\n" not in str(info.value)
    missing = tiny_train_config(
        workspace, processed, "logger=none", f"ckpt_path={workspace / 'nope.ckpt'}"
    )
    with pytest.raises(CheckpointError, match=r"does not exist"):
        train_model(missing)


def test_fast_dev_run_still_leaves_best_and_last(processed: Path, workspace: Path) -> None:
    result = train_model(tiny_train_config(workspace, processed, "debug=fast_dev_run"))
    assert result.best_checkpoint.is_file()
    assert result.last_checkpoint.is_file()
    assert result.run_id is None  # debug=fast_dev_run turns tracking off
    assert "test/acc" in result.metrics


# --- the CLI ------------------------------------------------------------------------------


def test_cli_trains_and_prints_a_summary(
    processed: Path, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train",
        "experiment=tiny",
        f"workspace={workspace}",
        f"data.processed_dir={processed}",
        "logger=none",
        "trainer.save_top_k=2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("run dir", "best checkpoint", "test acc", "test f1", "seconds", "tracking"):
        assert label in out
    [run_dir] = (workspace / "outputs").iterdir()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "best.ckpt" in checkpoints
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("epoch") for name in checkpoints)  # top-2 named by epoch


@pytest.mark.parametrize(
    ("override", "named"),
    [("trainer.colour=red", "trainer.colour"), ("trainer.max_epochs=abc", "trainer.max_epochs")],
)
def test_cli_bad_config_is_one_line_exit_2(
    override: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", override]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert named in lines[0]


def test_cli_missing_data_exits_1(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", f"workspace={workspace}", f"data.processed_dir={workspace / 'none'}"]
    assert main(args) == 1
    assert "opsloop data data=digits" in capsys.readouterr().err


def test_a_non_interactive_run_logs_one_line_per_epoch_not_bars_and_tables(
    processed: Path,
    workspace: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opsloop")
    cfg = tiny_train_config(workspace, processed, "logger=none", "trainer.enable_progress_bar=true")
    train_model(cfg)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "Total params" not in printed  # Lightning's model summary
    assert "it/s" not in printed
    assert "\r" not in printed
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "val/acc=" in epochs[-1]


def test_an_interactive_run_keeps_its_progress_bar_and_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    from opsloop import train

    monkeypatch.setattr(train, "interactive", lambda: True)
    cfg = tiny_train_config(Path("unused"), Path("unused"), "trainer.enable_progress_bar=true")
    callbacks = train.standard_callbacks(cfg.trainer, with_logger=False)
    assert any(isinstance(callback, RichProgressBar) for callback in callbacks)
    assert not any(isinstance(callback, train.EpochLog) for callback in callbacks)
    trainer = train.build_trainer(cfg.trainer, Path("unused"), callbacks=callbacks, logger=False)
    assert any(type(c).__name__.endswith("ModelSummary") for c in trainer.callbacks)


# --- small parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "devices"), [("1", 1), (" 2 ", 2), ("[0,1]", [0, 1]), ("auto", "auto"), ("-1", -1)]
)
def test_parse_devices(text: str, devices: object) -> None:
    assert parse_devices(text) == devices


@pytest.mark.parametrize("text", ["two", "[]", "[0.5]", "true", "{}"])
def test_parse_devices_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.devices"):
        parse_devices(text)


def test_batch_count_fraction_or_count() -> None:
    assert batch_count(1.0) == 1.0
    assert batch_count(0.25) == 0.25
    assert batch_count(2.0) == 2
    assert isinstance(batch_count(2.0), int)


def test_flatten_config_uses_dotted_keys(workspace: Path) -> None:
    cfg = tiny_train_config(workspace, workspace)
    flat = flatten_config(cfg)
    assert flat["trainer.max_epochs"] == "2"
    assert flat["data.class_names"] == str([str(i) for i in range(10)])
    assert flat["ckpt_path"] == "None"
    assert all(isinstance(value, str) for value in flat.values())


def test_git_state_outside_a_repository(tmp_path: Path) -> None:
    assert git_state(tmp_path) == ("unknown", "unknown")


def test_git_state_inside_a_repository(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    commit, dirty = git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert dirty == "false"
    (tmp_path / "a.txt").write_text("changed")
    assert git_state(tmp_path) == (commit, "true")
