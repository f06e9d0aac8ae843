"""Train a classifier on a processed dataset and track the run (MLflow unless told otherwise).

    opsloop train [overrides]        e.g. opsloop train model.channels=16 trainer.max_epochs=5

`train_model(cfg)` seeds everything, builds the model from the dataset's manifest, fits with
checkpointing and early stopping, tests the best checkpoint, and records the resolved config,
params, per-epoch metrics, lineage tags, the checkpoint and the model. Each run writes into its
own `<workspace>/<output_dir>/<timestamp>-<id>/` directory.

Why one file of ~600 lines: it is one stage whose parts (run directory, trainer, callbacks,
checkpoints, what gets tracked) only make sense together and are read top to bottom; split, each
part would import the others' private pieces.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import numpy.typing as npt
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import Logger
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.utilities import rank_zero_only

from opsloop import __version__
from opsloop.config import (
    PROFILERS,
    DataConfig,
    ModelConfig,
    OpsloopConfig,
    OptimConfig,
    TrainerConfig,
    config_hash,
    config_to_yaml,
    parse_devices,
    resolve_object,
)
from opsloop.data import Manifest, dataset_dir, load_split, read_manifest
from opsloop.data.datamodule import ProcessedDataModule
from opsloop.errors import CheckpointError, OpsloopError, first_line, redact_url
from opsloop.model import ImageClassifier
from opsloop.tracking import Tracker, make_tracker

logger = logging.getLogger(__name__)

# Lightning's DDP launcher re-runs this command in child processes; they read the run directory
# the launching process chose from here, so all ranks share one. Set it yourself to share one
# directory across torchrun or SLURM processes.
RUN_DIR_ENV = "OPSLOOP_RUN_DIR"
CHECKPOINT_LINEAGE_KEY = "opsloop_lineage"
VERSIONED_PACKAGES = ("torch", "lightning", "mlflow", "numpy", "opsloop")


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train_model`."""

    run_id: str | None
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: dict[str, float]  # the test metrics of the best checkpoint, plus the best val score
    tracking_uri: str | None
    seconds: float
    is_global_zero: bool = True  # False in the extra processes DDP launches


def train_model(
    cfg: OpsloopConfig,
    *,
    callbacks: Sequence[Callback] = (),
    parent_run_id: str | None = None,
) -> TrainResult:
    """Fit, test and track one model; `callbacks` join the standard ones (e.g. sweep pruning).

    With `parent_run_id` the run becomes a child of that run (a sweep's trials). Missing data,
    an unreachable tracking server and a bad resume checkpoint all fail before anything is
    written.
    """
    started = time.perf_counter()
    _route_lightning_logs()
    setup = prepare_run(cfg, parent_run_id)
    with cpu_threads(cfg.trainer.num_threads):
        L.seed_everything(cfg.seed, workers=True)
        classifier = classifier_for(cfg, setup.manifest)
        if cfg.ckpt_path:
            check_resume_checkpoint(Path(cfg.ckpt_path), classifier)
        return fit_and_track(cfg, setup, classifier, callbacks, started)


def fit_checkpoint(
    data: DataConfig,
    checkpoint: Path,
    *,
    model: ModelConfig | None = None,
    optim: OptimConfig | None = None,
    epochs: int = 4,
    seed: int = 0,
) -> Path:
    """Train a classifier in seconds and save it to `checkpoint`: untracked, no early stopping.

    For notebooks, benchmarks and test fixtures that need a real model of a prepared dataset;
    `train_model` is the tracked, configured run. The default network is small (8 channels, one
    block), which learns the digits to ~90% in four epochs.
    """
    from opsloop.data.datamodule import ProcessedDataModule

    manifest = read_manifest(dataset_dir(data))
    L.seed_everything(seed)
    classifier = ImageClassifier.for_dataset(
        model or ModelConfig(channels=8, depth=1, hidden=32, dropout=0.0),
        optim or OptimConfig(lr=0.01),
        image_shape=manifest.image_shape,
        class_names=manifest.class_names,
        pixel_mean=manifest.pixel_mean,
        pixel_std=manifest.pixel_std,
        pixel_max=manifest.pixel_max,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with _known_warnings_silenced():
        trainer.fit(classifier, ProcessedDataModule.from_config(data, seed=seed))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(checkpoint)
    return checkpoint


@dataclass(frozen=True)
class RunSetup:
    """What a run is checked against before anything is written."""

    manifest: Manifest
    data_path: Path
    run_dir: Path
    tracker: Tracker


def prepare_run(cfg: OpsloopConfig, parent_run_id: str | None) -> RunSetup:
    """Find the dataset and the tracking store, failing fast with the fix for either."""
    workspace = Path(cfg.workspace)
    data_path = dataset_dir(cfg.data)
    manifest = read_manifest(data_path)  # a missing dataset names `opsloop data data=<name>`
    run_dir = plan_run_dir(cfg, workspace)
    tracker = make_tracker(
        cfg.logger,
        workspace,
        run_name=cfg.logger.run_name or run_dir.name,
        parent_run_id=parent_run_id,
    )
    tracker.check_reachable()
    return RunSetup(manifest, data_path, run_dir, tracker)


def classifier_for(cfg: OpsloopConfig, manifest: Manifest) -> ImageClassifier:
    """A fresh model shaped for the dataset (image shape, classes, pixel statistics)."""
    return ImageClassifier.for_dataset(
        cfg.model,
        cfg.optim,
        image_shape=manifest.image_shape,
        class_names=manifest.class_names,
        pixel_mean=manifest.pixel_mean,
        pixel_std=manifest.pixel_std,
        pixel_max=manifest.pixel_max,
    )


def fit_and_track(
    cfg: OpsloopConfig,
    setup: RunSetup,
    classifier: ImageClassifier,
    callbacks: Sequence[Callback],
    started: float,
) -> TrainResult:
    """Fit, test the best checkpoint and record it all; only global zero talks to the tracker."""
    run_dir = setup.run_dir
    checkpoints = make_checkpoint_callback(cfg.trainer, run_dir / "checkpoints")
    lineage = LineageCallback(collect_lineage(cfg, setup.manifest))
    # Only global zero tracks. A launcher that starts every rank at once (torchrun, SLURM) must
    # not have the others open the store too: they would race to create a new store's schema.
    is_rank_zero = getattr(rank_zero_only, "rank", 0) == 0  # as the launcher set RANK etc.
    run_logger = setup.tracker.lightning_logger() if is_rank_zero else False
    trainer = build_trainer(
        cfg.trainer,
        run_dir,
        callbacks=[
            checkpoints,
            lineage,
            *standard_callbacks(cfg.trainer, with_logger=run_logger is not False),
            *callbacks,
        ],
        logger=run_logger,
    )
    run = setup.tracker.for_rank(trainer.is_global_zero)
    write_run_config(run_dir, shown_config(cfg))
    datamodule = ProcessedDataModule.from_config(cfg.data, seed=cfg.seed)
    with shared_run_dir(run_dir):
        try:
            run_id = run.start()
            record_inputs(run, cfg, run_dir, lineage.lineage)
            lineage.lineage["run_id"] = run_id or ""
            with _known_warnings_silenced():
                # weights_only: checkpoints are read without unpickling arbitrary objects.
                trainer.fit(
                    classifier, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True
                )
                best, last = settle_checkpoints(trainer, checkpoints, run_dir / "checkpoints")
                tested = trainer.test(
                    classifier,
                    datamodule=datamodule,
                    ckpt_path=str(best),
                    verbose=False,
                    weights_only=True,
                )
            metrics = summarize_metrics(tested, checkpoints, cfg.trainer.monitor)
            run.log_metrics(metrics, step=trainer.global_step)
            record_outputs(run, cfg, run_dir, best, classifier, setup.data_path)
        except BaseException:
            _finish_failed(run)
            raise
        run.finish("FINISHED")
    seconds = time.perf_counter() - started
    logger.info("trained in %.1f s: %s", seconds, _format_metrics(metrics))
    return TrainResult(
        run_id=run_id,
        run_dir=run_dir,
        best_checkpoint=best,
        last_checkpoint=last,
        metrics=metrics,
        tracking_uri=setup.tracker.tracking_uri,
        seconds=seconds,
        is_global_zero=trainer.is_global_zero,
    )


def _finish_failed(run: Tracker) -> None:
    """Mark the run failed without hiding the error that failed it."""
    try:
        run.finish("FAILED")
    except OpsloopError as exc:
        logger.warning("could not mark the run as failed: %s", exc)


# --- the run directory --------------------------------------------------------------------


def plan_run_dir(cfg: OpsloopConfig, workspace: Path) -> Path:
    """The run's directory, absolute; nothing is created yet.

    The one DDP's launching process chose, else `cfg.run_dir` (relative to the cwd), else a
    fresh `<workspace>/<output_dir>/<YYYY-mm-dd_HH-MM-SS>-<id>`.
    """
    shared = os.environ.get(RUN_DIR_ENV)
    if shared:
        return Path(shared).resolve()
    if cfg.run_dir:
        return Path(cfg.run_dir).resolve()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return (workspace / cfg.output_dir / f"{stamp}-{uuid.uuid4().hex[:6]}").resolve()


@contextmanager
def shared_run_dir(run_dir: Path) -> Iterator[None]:
    """Publish the run directory to DDP child processes for as long as this run lasts."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


@rank_zero_only
def write_run_config(run_dir: Path, cfg: OpsloopConfig) -> None:
    """Save the resolved config beside the run's checkpoints.

    A reused run directory (`run_dir=...`) drops the previous run's profiler reports, which
    Lightning would otherwise append to.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "profiler", ignore_errors=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Use `count` torch CPU threads for the duration (0 keeps torch's default)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the trainer --------------------------------------------------------------------------


def build_trainer(
    cfg: TrainerConfig,
    run_dir: Path,
    *,
    callbacks: Sequence[Callback],
    logger: Logger | bool,
) -> L.Trainer:
    """A Lightning Trainer configured by `cfg`, writing everything into `run_dir`."""
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=parse_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cast(Any, cfg.precision),
        deterministic=cfg.deterministic,
        max_epochs=cfg.max_epochs,
        gradient_clip_val=cfg.gradient_clip_val,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=cfg.enable_progress_bar and interactive(),
        # The layer table is for a person at a terminal; in a log it is noise every run.
        enable_model_summary=interactive(),
        profiler=make_profiler(cfg.profiler, run_dir / "profiler"),
        fast_dev_run=cfg.fast_dev_run,
        overfit_batches=batch_count(cfg.overfit_batches),
        limit_train_batches=batch_count(cfg.limit_train_batches),
        limit_val_batches=batch_count(cfg.limit_val_batches),
        limit_test_batches=batch_count(cfg.limit_test_batches),
        callbacks=list(callbacks),
        logger=logger,
        default_root_dir=str(run_dir),
    )


def batch_count(value: float) -> int | float:
    """Lightning reads a float as a fraction of the batches and an int as a number of batches."""
    return int(value) if value > 1 else value


def make_profiler(name: str | None, directory: Path) -> Profiler | None:
    """The profiler `trainer.profiler` names, writing its report files into `directory`."""
    if name is None:
        return None
    profiler: type[Profiler] = resolve_object(PROFILERS[name])  # validated with the config
    return profiler(dirpath=str(directory), filename="profile")


def make_checkpoint_callback(cfg: TrainerConfig, directory: Path) -> ModelCheckpoint:
    """Keep the best checkpoints on `cfg.monitor` and the last one, under fixed names."""
    return ModelCheckpoint(
        dirpath=str(directory),
        # One best checkpoint keeps its name; with several, each is named by epoch and the best
        # is copied to best.ckpt after training.
        filename="best" if cfg.save_top_k == 1 else "epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=cfg.monitor,
        mode=cfg.monitor_mode,
        save_top_k=cfg.save_top_k,
        save_last=True,
        # A reused run directory overwrites best/last.ckpt instead of adding best-v1.ckpt.
        enable_version_counter=False,
    )


def standard_callbacks(cfg: TrainerConfig, *, with_logger: bool) -> list[Callback]:
    """Early stopping, a progress bar and a learning-rate monitor, as the config asks."""
    callbacks: list[Callback] = []
    if cfg.early_stopping_patience > 0:
        callbacks.append(
            EarlyStopping(
                monitor=cfg.monitor, mode=cfg.monitor_mode, patience=cfg.early_stopping_patience
            )
        )
    if cfg.enable_progress_bar:
        # On a terminal a bar redraws in place; in a log (CI, `make run > log`) every redraw
        # would be a line, so one line per epoch stands in for it.
        callbacks.append(RichProgressBar() if interactive() else EpochLog())
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return callbacks


def interactive() -> bool:
    """Whether a person watches: stderr is a terminal (not a file, a pipe or CI's log)."""
    return sys.stderr.isatty()


class EpochLog(Callback):
    """One log line per epoch with its metrics: progress for a non-interactive run."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(("train/", "val/")) and value.numel() == 1
        }
        logger.info(
            "epoch %d/%d: %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            _format_metrics(metrics) or "no metrics yet",
        )


class LineageCallback(Callback):
    """Stores the run's lineage inside every checkpoint, so a checkpoint describes itself."""

    def __init__(self, lineage: dict[str, str]) -> None:
        self.lineage = lineage

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_LINEAGE_KEY] = dict(self.lineage)


@contextmanager
def _known_warnings_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        # The splits are in-memory tensors: worker processes would only add start-up time.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        # Lightning's model summary still uses a torch pytree API newer torch deprecates.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
        yield


def _route_lightning_logs() -> None:
    """Let Lightning's records reach the application's logging once, not twice.

    `import lightning` attaches its own stderr handler to the `lightning` logger; when the
    application has configured the root logger (as the CLI does), every record would print twice.
    """
    own_handler = getattr(L, "_console", None)
    if logging.getLogger().handlers and isinstance(own_handler, logging.Handler):
        logging.getLogger("lightning").removeHandler(own_handler)


# --- checkpoints --------------------------------------------------------------------------


def check_resume_checkpoint(path: Path, model: ImageClassifier) -> None:
    """Refuse, before fitting, a resume checkpoint that is missing, corrupt or of another shape."""
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; set ckpt_path to a .ckpt written by `opsloop train`"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage bytes fail anywhere in the unpickler (IndexError, ...)
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first_line(exc)}; "
            "resume from a .ckpt written by `opsloop train`"
        ) from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} has no state_dict; resume from a .ckpt written by `opsloop train`"
        )
    mismatch = _first_shape_mismatch(state, model.state_dict())
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} belongs to another model shape ({mismatch}); resume with the "
            "model and dataset it was trained with, or drop ckpt_path"
        )


def _first_shape_mismatch(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> str:
    for key, tensor in expected.items():
        if key not in saved:
            return f"{key} is missing"
        found = getattr(saved[key], "shape", None)
        if found is None or tuple(found) != tuple(tensor.shape):
            return f"{key} is {_shape(found)}, the model needs {_shape(tensor.shape)}"
    unexpected = sorted(set(saved) - set(expected))
    return f"unexpected {unexpected[0]}" if unexpected else ""


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape is not None else "not a tensor"


def settle_checkpoints(
    trainer: L.Trainer, callback: ModelCheckpoint, directory: Path
) -> tuple[Path, Path]:
    """Make sure `best.ckpt` and `last.ckpt` exist and return them.

    `fast_dev_run` saves no checkpoints and several top-k checkpoints are named by epoch, so
    the final weights or the best of the top k are written under the fixed names here.
    """
    best, last = directory / "best.ckpt", directory / "last.ckpt"
    if not callback.best_model_path:
        trainer.save_checkpoint(best)
    elif Path(callback.best_model_path).resolve() != best.resolve():
        _copy_on_rank_zero(Path(callback.best_model_path), best)
        trainer.strategy.barrier("opsloop-best-checkpoint")
    if not callback.last_model_path:
        trainer.save_checkpoint(last)
    return best, last


@rank_zero_only
def _copy_on_rank_zero(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def summarize_metrics(
    tested: Sequence[Mapping[str, float]], callback: ModelCheckpoint, monitor: str
) -> dict[str, float]:
    """The test metrics of the best checkpoint plus the best monitored validation score."""
    metrics = {key: float(value) for key, value in (tested[0] if tested else {}).items()}
    if callback.best_model_score is not None:
        metrics[f"{monitor}_best"] = float(callback.best_model_score)
    return metrics


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{key}={value:.4f}" for key, value in sorted(metrics.items()))


# --- tracking -----------------------------------------------------------------------------


def record_inputs(run: Tracker, cfg: OpsloopConfig, run_dir: Path, tags: Mapping[str, str]) -> None:
    """Params (the flattened resolved config), lineage tags and the config file."""
    run.set_tags({**tags, "run_dir": str(run_dir.resolve())})
    run.log_params(flatten_config(shown_config(cfg)))
    run.log_artifact(run_dir / "config.yaml", "config")


def record_outputs(
    run: Tracker,
    cfg: OpsloopConfig,
    run_dir: Path,
    best: Path,
    classifier: ImageClassifier,
    data_path: Path,
) -> None:
    """The best checkpoint, the profiler's report and the model with its signature."""
    run.log_artifact(best, "checkpoints")
    profiler_dir = run_dir / "profiler"
    if profiler_dir.is_dir():
        run.log_artifact(profiler_dir, "profiler")
    if cfg.logger.log_model:
        run.log_model(classifier.net.cpu(), input_example(data_path))


def input_example(data_path: Path, count: int = 4) -> npt.NDArray[np.float32]:
    """A few real validation images as raw float32 pixels: what the served model receives."""
    images = load_split(data_path, "val").images[:count]
    return np.ascontiguousarray(images, dtype=np.float32)


def collect_lineage(cfg: OpsloopConfig, manifest: Manifest) -> dict[str, str]:
    """Everything needed to trace a model back: code, data, config, seed and package versions."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    lineage = {
        "git_commit": commit,
        "git_dirty": dirty,
        "dataset_name": manifest.name,
        "dataset_hash": manifest.content_hash,
        "config_hash": config_hash(cfg),
        "seed": str(cfg.seed),
        "opsloop_version": __version__,
        "python_version": platform.python_version(),
    }
    lineage.update({f"version.{name}": package_version(name) for name in VERSIONED_PACKAGES})
    return lineage


def git_state(directory: Path) -> tuple[str, str]:
    """(commit, "true"/"false" for uncommitted changes), or ("unknown", "unknown") outside git."""
    try:
        commit = _git(directory, "rev-parse", "HEAD")
        dirty = _git(directory, "status", "--porcelain") != ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, str(dirty).lower()


def _git(directory: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=directory, capture_output=True, text=True, check=True, timeout=20
    )
    return done.stdout.strip()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def shown_config(cfg: OpsloopConfig) -> OpsloopConfig:
    """The config as it is saved and logged with the run: passwords in its URLs hidden."""
    tracking_uri, storage = cfg.logger.tracking_uri, cfg.sweep.storage
    return replace(
        cfg,
        logger=replace(cfg.logger, tracking_uri=redact_url(tracking_uri) if tracking_uri else None),
        sweep=replace(cfg.sweep, storage=redact_url(storage) if storage else None),
    )


def flatten_config(cfg: OpsloopConfig) -> dict[str, str]:
    """The resolved config as flat `section.key` params, values as strings."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    flat: dict[str, str] = {}
    _flatten_into(flat, "", container)
    return flat


def _flatten_into(flat: dict[str, str], prefix: str, node: object) -> None:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten_into(flat, f"{prefix}{key}.", value)
    else:
        flat[prefix.rstrip(".")] = str(node)
