"""Experiment tracking: the one module that talks to MLflow (and Weights & Biases).

`make_tracker(cfg.logger, workspace, ...)` returns an `MlflowTracker` (the embedded SQLite store
in the workspace, or a server named by `$OPSLOOP_TRACKING_URI`), a `WandbTracker` (offline by
default, no account) or a `NullTracker`; training drives any of them the same way. The helpers
below let other stages fetch a run's checkpoint or attach their outputs to a training run.

Why one file of ~600 lines: it is the one place that imports MLflow (and W&B) for runs, so an
upstream API change is a one-file fix; the three trackers share one interface and read best side
by side.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from opsloop.config import LoggerConfig
from opsloop.errors import ModelNotFoundError, TrackingError, first_line, redact_url

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
    from torch import nn

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "OPSLOOP_TRACKING_URI"
PARENT_RUN_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs (sweep trials) by
MODEL_URI_TAG = "opsloop.model_uri"  # the logged model of a training run, for registration
BEST_CHECKPOINT_ARTIFACT = "checkpoints/best.ckpt"
HEALTH_TIMEOUT_SECONDS = 3.0
# MLflow accepts at most 100 params per batch call.
_PARAM_BATCH = 100

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def resolve_tracking_uri(cfg: LoggerConfig, workspace: Path) -> str:
    """`$OPSLOOP_TRACKING_URI`, else `cfg.tracking_uri`, else the workspace's SQLite store."""
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{workspace.resolve() / 'mlflow.db'}"


def artifact_root(workspace: Path) -> Path:
    """Where the embedded store keeps artifacts, so nothing lands in the cwd's `mlruns/`."""
    return workspace.resolve() / "mlartifacts"


def artifact_location(tracking_uri: str, workspace: Path) -> str | None:
    """The artifact location for new experiments: ours for a local store, the server's otherwise."""
    if _is_http(tracking_uri):
        return None  # a server decides (mlflow-artifacts proxy, S3, GCS)
    return artifact_root(workspace).as_uri()


def check_tracking_reachable(uri: str) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    if _is_http(uri):
        _check_http_server(uri)
    elif uri.startswith("sqlite:///"):
        _check_sqlite_path(uri)
    elif _is_file_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise TrackingError(
            f"the MLflow file store {uri} is in maintenance mode in MLflow 3 and refuses to start; "
            "use a sqlite:/// URI (the default) or a tracking server"
        )


def _is_file_store(uri: str) -> bool:
    return uri.startswith(("file:", "/", "./", "../", "~"))


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _check_http_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_SECONDS) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:  # it answered, but not with 2xx
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"cannot reach the tracking server at {redact_url(uri)} ({reason}); "
            f"start it or unset {TRACKING_URI_ENV}"
        ) from exc
    if status != 200:
        raise TrackingError(
            f"the tracking server at {redact_url(uri)} answered {status} on /health; "
            f"check the server or unset {TRACKING_URI_ENV}"
        )


def _check_sqlite_path(uri: str) -> None:
    database = uri.removeprefix("sqlite:///")
    if database in ("", ":memory:"):
        return
    path = Path(database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"cannot create the tracking store's directory {path.parent} for {uri}: "
            f"{exc.strerror or exc}; choose a writable workspace or set {TRACKING_URI_ENV}"
        ) from exc
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise TrackingError(
            f"the tracking store {path} is not writable; "
            f"fix its permissions, choose another workspace or set {TRACKING_URI_ENV}"
        )


# --- helpers other stages use on an existing run --------------------------------------------


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _get_run(client: Any, run_id: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise ModelNotFoundError(
            f"no MLflow run '{run_id}' in {redact_url(tracking_uri)}; "
            "pass a run id printed by `opsloop train` (or set OPSLOOP_TRACKING_URI to its store)"
        ) from exc


def checkpoint_for_run(run_id: str, tracking_uri: str, dest: Path) -> Path:
    """Download run `run_id`'s `checkpoints/best.ckpt` into `dest` and return the file's path."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    _get_run(_client(tracking_uri), run_id, tracking_uri)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=BEST_CHECKPOINT_ARTIFACT,
            dst_path=str(dest),
            tracking_uri=tracking_uri,
        )
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(
            f"run '{run_id}' has no {BEST_CHECKPOINT_ARTIFACT} artifact; "
            "use a run made by `opsloop train` that finished training"
        ) from exc
    return Path(local)


def log_artifacts_to_run(
    run_id: str, tracking_uri: str, local_dir: Path, artifact_path: str
) -> None:
    """Attach every file under `local_dir` to an existing run, under `artifact_path`."""
    client = _client(tracking_uri)
    _get_run(client, run_id, tracking_uri)
    with tracking_errors(tracking_uri):
        client.log_artifacts(run_id, str(local_dir), artifact_path)


def log_metrics_to_run(run_id: str, tracking_uri: str, metrics: Mapping[str, float]) -> None:
    """Add metrics to an existing run (e.g. an evaluation of its checkpoint)."""
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    _get_run(client, run_id, tracking_uri)
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    with tracking_errors(tracking_uri):
        client.log_batch(run_id, metrics=batch)


def run_lineage(run_id: str, tracking_uri: str) -> dict[str, str]:
    """A training run's lineage tags (git commit, dataset and config hashes, seed, versions)."""
    run = _get_run(_client(tracking_uri), run_id, tracking_uri)
    tags: dict[str, str] = dict(run.data.tags)
    return {key: value for key, value in tags.items() if not key.startswith("mlflow.")}


def run_metrics(run_id: str, tracking_uri: str) -> dict[str, float]:
    """A run's latest metric values (e.g. `test/acc`, `eval/ece`)."""
    run = _get_run(_client(tracking_uri), run_id, tracking_uri)
    return {key: float(value) for key, value in run.data.metrics.items()}


def create_run(
    tracking_uri: str,
    workspace: Path,
    *,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run (e.g. a sweep's parent run) and return its id; end it with `finish_run`."""
    client = _client(tracking_uri)
    all_tags = dict(tags or {})
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    with tracking_errors(tracking_uri):
        experiment_id = _experiment_id(client, experiment, tracking_uri, workspace)
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    return str(run.info.run_id)


def finish_run(run_id: str, tracking_uri: str, status: RunStatus = "FINISHED") -> None:
    """Mark a run created with `create_run` as ended."""
    with tracking_errors(tracking_uri):
        _client(tracking_uri).set_terminated(run_id, status)


def log_params_to_run(run_id: str, tracking_uri: str, params: Mapping[str, object]) -> None:
    """Log params (stringified) to an existing run, in MLflow's batch-size chunks."""
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    client = _client(tracking_uri)
    with tracking_errors(tracking_uri):
        for start in range(0, len(items), _PARAM_BATCH):
            client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])


def set_run_tags(run_id: str, tracking_uri: str, tags: Mapping[str, str]) -> None:
    """Set tags on an existing run (e.g. a trial's Optuna state, a sweep's best params)."""
    from mlflow.entities import RunTag

    client = _client(tracking_uri)
    with tracking_errors(tracking_uri):
        client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def reopen_run(run_id: str, tracking_uri: str) -> bool:
    """Mark an ended run RUNNING again; False when the store has no such run (or refuses)."""
    from mlflow.exceptions import MlflowException

    try:
        _client(tracking_uri).update_run(run_id, status="RUNNING")
    except MlflowException:
        return False
    return True


def connect_tracking_store(tracking_uri: str) -> None:
    """Open the store now, so a new SQLite store's schema is created (migrated) at once.

    Parallel workers on a fresh workspace would otherwise race to create it at their first run;
    a caller that starts workers together retries this call (a loser finds the schema complete).
    """
    try:
        _client(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow, SQLAlchemy and Alembic each raise their own
        raise TrackingError(
            f"cannot open the tracking store {redact_url(tracking_uri)}: {first_line(exc)}; "
            f"check logger.tracking_uri or {TRACKING_URI_ENV}"
        ) from exc


def ensure_experiment(cfg: LoggerConfig, workspace: Path) -> str:
    """The id of experiment `cfg.experiment` in the resolved store, created if missing."""
    uri = resolve_tracking_uri(cfg, workspace)
    with tracking_errors(uri):
        return _experiment_id(_client(uri), cfg.experiment, uri, workspace)


def _experiment_id(client: Any, name: str, tracking_uri: str, workspace: Path) -> str:
    from mlflow.exceptions import MlflowException

    existing = client.get_experiment_by_name(name)
    if existing is not None and existing.lifecycle_stage != "deleted":
        return str(existing.experiment_id)
    location = artifact_location(tracking_uri, workspace)
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:
        # Workers started together all find no experiment and all create it; the losers find
        # the winner's now (a name taken by a deleted experiment still fails, as it should).
        existing = client.get_experiment_by_name(name)
        if existing is None or existing.lifecycle_stage == "deleted":
            raise
        return str(existing.experiment_id)


@contextmanager
def tracking_errors(tracking_uri: str, store: str = "the tracking store") -> Iterator[None]:
    """MLflow's multi-line exceptions become one-line `TrackingError`s naming the store (its
    password hidden); the registry uses it too, as `store="the registry"`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise TrackingError(
            f"{store} {redact_url(tracking_uri)} refused a request: {first_line(exc)}"
        ) from exc


# --- trackers: one interface for MLflow, W&B and none ---------------------------------------


class Tracker(Protocol):
    """What training needs from an experiment tracker; every method is a no-op on a NullTracker."""

    @property
    def run_id(self) -> str | None: ...

    @property
    def tracking_uri(self) -> str | None: ...

    def lightning_logger(self) -> Logger | Literal[False]:
        """The logger to hand to the Trainer (it records per-epoch metrics), or False."""
        ...

    def check_reachable(self) -> None:
        """Raise `TrackingError` now, before training, if the store cannot be used."""
        ...

    def for_rank(self, is_global_zero: bool) -> Tracker:
        """Itself on the global-zero process, a NullTracker on every other DDP process."""
        ...

    def start(self) -> str | None:
        """Create the run (global zero only) and return its id."""
        ...

    def log_params(self, params: Mapping[str, object]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, local_path: Path, artifact_path: str) -> None:
        """Log a file or a whole directory under `artifact_path`."""
        ...

    def log_model(self, model: nn.Module, input_example: npt.NDArray[np.float32]) -> None:
        """Log the trained network in the tracker's model format, with a signature."""
        ...

    def finish(self, status: RunStatus = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing: stands in for `logger=none` and on non-zero DDP ranks."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def lightning_logger(self) -> Literal[False]:
        return False

    def check_reachable(self) -> None:
        pass

    def for_rank(self, is_global_zero: bool) -> Tracker:
        return self

    def start(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, object]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: Path, artifact_path: str) -> None:
        pass

    def log_model(self, model: nn.Module, input_example: npt.NDArray[np.float32]) -> None:
        pass

    def finish(self, status: RunStatus = "FINISHED") -> None:
        pass


class MlflowTracker:
    """An MLflow run in the embedded SQLite store or on a tracking server.

    Lightning's `MLFlowLogger` creates the run lazily, on the global-zero process only, so the
    extra processes DDP launches never create runs of their own.
    """

    def __init__(
        self,
        cfg: LoggerConfig,
        *,
        tracking_uri: str,
        workspace: Path,
        run_name: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.tracking_uri: str | None = tracking_uri
        self._uri = tracking_uri
        self.workspace = workspace
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self._logger: MLFlowLogger | None = None
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def lightning_logger(self) -> MLFlowLogger:
        if self._logger is None:
            from lightning.pytorch.loggers import MLFlowLogger

            tags = dict(self.cfg.tags)
            if self.parent_run_id:
                tags[PARENT_RUN_TAG] = self.parent_run_id
            self._logger = MLFlowLogger(
                experiment_name=self.cfg.experiment,
                run_name=self.run_name,
                tracking_uri=self._uri,
                tags=tags,
                artifact_location=artifact_location(self._uri, self.workspace),
                log_model=False,  # the tracker logs the best checkpoint itself, under a fixed name
            )
        return self._logger

    def check_reachable(self) -> None:
        check_tracking_reachable(self._uri)

    def for_rank(self, is_global_zero: bool) -> Tracker:
        return self if is_global_zero else NullTracker()

    def start(self) -> str | None:
        with tracking_errors(self._uri):
            self._run_id = self.lightning_logger().run_id  # the logger creates the run
        logger.info("MLflow run %s in %s", self._run_id, redact_url(self._uri))
        return self._run_id

    def _client_and_run(self) -> tuple[Any, str]:
        if self._run_id is None:
            raise TrackingError(f"no MLflow run was started in {redact_url(self._uri)}")
        return self.lightning_logger().experiment, self._run_id

    def log_params(self, params: Mapping[str, object]) -> None:
        _, run_id = self._client_and_run()
        log_params_to_run(run_id, self._uri, params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        client, run_id = self._client_and_run()
        with tracking_errors(self._uri):
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        client, run_id = self._client_and_run()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        with tracking_errors(self._uri):
            client.log_batch(run_id, metrics=batch)

    def log_artifact(self, local_path: Path, artifact_path: str) -> None:
        client, run_id = self._client_and_run()
        with tracking_errors(self._uri):
            if local_path.is_dir():
                client.log_artifacts(run_id, str(local_path), artifact_path)
            else:
                client.log_artifact(run_id, str(local_path), artifact_path)

    def log_model(self, model: nn.Module, input_example: npt.NDArray[np.float32]) -> None:
        """Log the network as an MLflow model with a signature inferred from real raw pixels.

        Saved as a `torch.export` program (`pt2`): loading it needs torch only, never opsloop's
        code and never unpickling.
        """
        import importlib.metadata

        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        _, run_id = self._client_and_run()
        model.eval()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        signature = infer_signature(input_example, output)
        # Explicit requirements skip MLflow's slow inference (it re-imports the model in a
        # subprocess to see which packages it touches).
        requirements = [f"torch=={importlib.metadata.version('torch')}"]
        with tracking_errors(self._uri), _fluent_run(self._uri, run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                input_example=input_example,
                serialization_format="pt2",
                pip_requirements=requirements,
            )
        # MLflow 3 keeps the model as a LoggedModel (`models:/m-...`), not under the run's
        # artifacts: the registry registers that URI.
        self.set_tags({MODEL_URI_TAG: info.model_uri})

    def finish(self, status: RunStatus = "FINISHED") -> None:
        if self._run_id is None:
            return  # never started: there is no run to end
        client, run_id = self._client_and_run()
        with tracking_errors(self._uri):
            client.set_terminated(run_id, status)


@contextmanager
def _fluent_run(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Make `run_id` MLflow's active run for a fluent-only API, nesting under any active run.

    `mlflow.pytorch.log_model` links the model to the active run only; a sweep may already have
    its parent run active in this process.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


class WandbTracker:
    """A Weights & Biases run; offline mode (the default) needs no account or network."""

    def __init__(
        self,
        cfg: LoggerConfig,
        *,
        workspace: Path,
        run_name: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.save_dir = Path(os.environ.get("WANDB_DIR") or workspace).resolve()
        self.tracking_uri: str | None = str(self.save_dir / "wandb")
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self._logger: WandbLogger | None = None
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def lightning_logger(self) -> WandbLogger:
        if self._logger is None:
            from lightning.pytorch.loggers import WandbLogger

            offline = self.cfg.wandb_mode == "offline"
            extra: dict[str, Any] = {} if offline else {"mode": self.cfg.wandb_mode}
            self._logger = WandbLogger(
                name=self.run_name,
                project=self.cfg.wandb_project,
                save_dir=str(self.save_dir),
                offline=offline,
                group=self.parent_run_id,  # a sweep's trials group under its parent
                tags=[f"{k}:{v}" for k, v in self.cfg.tags.items()],
                **extra,
            )
        return self._logger

    def check_reachable(self) -> None:
        pass  # offline mode writes locally; online mode reports its own connection errors

    def for_rank(self, is_global_zero: bool) -> Tracker:
        return self if is_global_zero else NullTracker()

    def _run(self) -> Any:
        return self.lightning_logger().experiment

    def start(self) -> str | None:
        run = self._run()
        self._run_id = str(run.id)
        logger.info("W&B run %s (%s) in %s", run.id, self.cfg.wandb_mode, self.tracking_uri)
        return self._run_id

    def log_params(self, params: Mapping[str, object]) -> None:
        self._run().config.update(dict(params), allow_val_change=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        # W&B tags are bare labels; key/value lineage belongs in the run's config.
        self._run().config.update({f"lineage/{k}": v for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.lightning_logger().log_metrics(dict(metrics), step=step)

    def log_artifact(self, local_path: Path, artifact_path: str) -> None:
        import wandb

        run = self._run()
        name = f"{run.id}-{artifact_path}".replace("/", "-")
        artifact = wandb.Artifact(name=name, type=artifact_path.split("/")[0])
        if local_path.is_dir():
            artifact.add_dir(str(local_path))
        else:
            artifact.add_file(str(local_path), name=Path(artifact_path).name)
        run.log_artifact(artifact)

    def log_model(self, model: nn.Module, input_example: npt.NDArray[np.float32]) -> None:
        # W&B has no model flavour: the best checkpoint, logged as an artifact, is the model.
        logger.debug("W&B: the model is the logged checkpoint artifact")

    def finish(self, status: RunStatus = "FINISHED") -> None:
        if self._run_id is None:
            return  # never started: there is no run to end
        self._run().finish(exit_code=0 if status == "FINISHED" else 1)


def make_tracker(
    cfg: LoggerConfig,
    workspace: Path,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> Tracker:
    """The tracker `cfg.name` names: mlflow, wandb or none."""
    if cfg.name == "mlflow":
        return MlflowTracker(
            cfg,
            tracking_uri=resolve_tracking_uri(cfg, workspace),
            workspace=workspace,
            run_name=run_name or cfg.run_name,
            parent_run_id=parent_run_id,
        )
    if cfg.name == "wandb":
        return WandbTracker(
            cfg,
            workspace=workspace,
            run_name=run_name or cfg.run_name,
            parent_run_id=parent_run_id,
        )
    return NullTracker()
