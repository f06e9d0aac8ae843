"""The whole loop in one command: data -> train -> evaluate -> register -> export -> promote.

    opsloop pipeline [overrides]        # what `make run` runs

Export comes before the promotion gate on purpose: the gate scores the exact bundle that would be
served (accuracy and latency under ONNX Runtime), not the training checkpoint. The champion's
bundle is then materialised, verified, at `<workspace>/<registry.bundle_dir>/<model name>/`.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from opsloop.config import OpsloopConfig
from opsloop.errors import ConfigError
from opsloop.workspace import GENERATED_CONFIG_HEADER, Workspace

if TYPE_CHECKING:
    from opsloop.export import ExportResult
    from opsloop.registry import VersionInfo

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StageTiming:
    name: str
    seconds: float
    detail: str


@dataclass
class PipelineResult:
    """What `opsloop pipeline` prints as its summary table."""

    run_id: str
    model_name: str
    model_version: str
    accuracy: float
    promoted: bool
    decision: str
    champion_version: str | None
    bundle_path: Path
    stages: list[StageTiming] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)


def timed(
    stages: list[StageTiming], name: str, work: Callable[[], T], describe: Callable[[T], str]
) -> T:
    """Run one stage, recording how long it took and a one-line description of its output."""
    logger.info("pipeline: %s", name)
    start = time.perf_counter()
    value = work()
    stages.append(StageTiming(name, time.perf_counter() - start, describe(value)))
    return value


def run_pipeline(
    cfg: OpsloopConfig, *, promote: bool = True, outputs: Path | None = None
) -> PipelineResult:
    """Run every stage with `cfg`; the registry and bundles live in the tracking store.

    With `promote=False` it stops after register and export: the new version is the
    `challenger`, and the champion, its materialised bundle and dvc.lock stay as they are (the
    loop gates its retrained models itself). `outputs` moves the run directory, the evaluation
    report and the candidate bundle from the workspace's dvc.yaml places into that directory.
    """
    from opsloop.data import prepare_dataset
    from opsloop.evaluate import evaluate_run
    from opsloop.export import export_bundle, lineage_from_run
    from opsloop.registry import (
        CHAMPION,
        ModelRef,
        attach_bundle,
        download_bundle,
        promote_model,
        register_model,
    )
    from opsloop.tracking import resolve_tracking_uri, run_lineage
    from opsloop.train import train_model

    if cfg.logger.name != "mlflow":
        raise ConfigError(
            f"logger.name={cfg.logger.name}: the pipeline registers models in MLflow; "
            "use logger=mlflow (the default)"
        )
    workspace = Workspace(Path(cfg.workspace))
    uri = resolve_tracking_uri(cfg.logger, workspace.root)
    name = cfg.registry.model_name
    stages: list[StageTiming] = []
    # The same output paths as dvc.yaml's stages, so `dvc commit` can record this run.
    places = workspace if outputs is None else Workspace(outputs)
    if cfg.run_dir is None:
        cfg = dataclasses.replace(cfg, run_dir=str(places.pipeline_run_dir))

    data = timed(stages, "data", lambda: prepare_dataset(cfg.data), _describe_data)
    trained = timed(stages, "train", lambda: train_model(cfg), _describe_training)
    run_id = _require_run_id(trained.run_id)
    evaluation = timed(
        stages,
        "evaluate",
        lambda: evaluate_run(
            run_id,
            cfg.data,
            cfg.logger,
            workspace=workspace.root,
            out_dir=places.evaluation_dir,
            seed=cfg.seed,
        ),
        lambda result: (
            f"accuracy {result.metrics['accuracy']:.4f}, ECE {result.metrics['ece']:.4f}"
        ),
    )
    version = timed(
        stages,
        "register",
        lambda: register_model(run_id, name, uri),
        lambda info: f"{info.name} v{info.version} (challenger)",
    )
    exported = timed(
        stages,
        "export",
        lambda: export_bundle(
            trained.best_checkpoint,
            cfg.data,
            places.candidate_bundle,
            model_name=name,
            model_version=version.version,
            lineage=lineage_from_run(run_lineage(run_id, uri), run_id),
            metrics=_bundle_metrics(trained.metrics, evaluation.metrics),
            evaluation={"per_class": evaluation.per_class, "robustness": evaluation.robustness},
            quantize=cfg.registry.quantize,
        ),
        lambda result: f"{result.path} (parity {result.parity_max_abs_diff:.1e})",
    )
    attach_bundle(version, exported.path, uri)
    if not promote:
        return PipelineResult(
            run_id=run_id,
            model_name=name,
            model_version=version.version,
            accuracy=evaluation.metrics["accuracy"],
            promoted=False,
            decision="not gated (promotion left to the caller)",
            champion_version=None,
            bundle_path=exported.path,
            stages=stages,
        )
    decision = timed(
        stages,
        "promote",
        lambda: promote_model(name, cfg.registry, cfg.data, uri, cache_dir=workspace.bundle_cache),
        lambda d: ("promoted" if d.promoted else "refused") + f": {d.reason}",
    )
    served = workspace.served_bundle(cfg.registry.bundle_dir, name)
    champion_bundle, champion = timed(
        stages,
        "materialise",
        lambda: download_bundle(ModelRef(name, alias=CHAMPION), uri, served),
        lambda pair: f"{name}@champion = v{pair[1].version} at {served}",
    )
    del data, champion_bundle
    timed(stages, "dvc commit", lambda: record_in_dvc(cfg, workspace), lambda done: done)
    return PipelineResult(
        run_id=run_id,
        model_name=name,
        model_version=version.version,
        accuracy=evaluation.metrics["accuracy"],
        promoted=decision.promoted,
        decision=decision.reason,
        champion_version=champion.version,
        bundle_path=served,
        stages=stages,
    )


def register_run(
    cfg: OpsloopConfig, run_id: str, *, alias: str | None = "challenger"
) -> tuple[VersionInfo, ExportResult]:
    """Register a training run's model as a new version, with its verified bundle attached.

    What `opsloop register` runs: a version the gate can score needs its bundle, so the run's
    best checkpoint is exported (with the run's test and evaluation metrics) and attached. If
    the export fails, the version is deleted again: no version is left without its bundle.
    """
    from opsloop.export import export_run
    from opsloop.registry import attach_bundle, delete_version, register_model
    from opsloop.tracking import resolve_tracking_uri, run_metrics

    workspace = Workspace(Path(cfg.workspace))
    uri = resolve_tracking_uri(cfg.logger, workspace.root)
    info = register_model(run_id, cfg.registry.model_name, uri, alias=alias)
    try:
        metrics = {
            key: value
            for key, value in run_metrics(run_id, uri).items()
            if key.startswith(("test/", "eval/"))
        }
        exported = export_run(
            run_id,
            cfg,
            workspace.candidate_bundle,
            model_version=info.version,
            metrics=metrics,
            quantize=cfg.registry.quantize,
        )
        attach_bundle(info, exported.path, uri)
    except BaseException:
        delete_version(info, uri)
        raise
    return info, exported


def _require_run_id(run_id: str | None) -> str:
    if run_id is None:
        raise ConfigError("training produced no MLflow run; the pipeline needs logger=mlflow")
    return run_id


def _describe_data(result: Any) -> str:
    status = "written" if result.written else "unchanged"
    return f"{result.path} ({status}, {result.content_hash[:12]})"


def _describe_training(result: Any) -> str:
    return f"run {result.run_id}, test acc {result.metrics.get('test/acc', float('nan')):.4f}"


def _bundle_metrics(
    train: Mapping[str, float], evaluation: Mapping[str, float]
) -> dict[str, float]:
    metrics = {key: float(value) for key, value in train.items() if key.startswith("test/")}
    metrics |= {f"eval/{key}": float(value) for key, value in evaluation.items()}
    return metrics


def record_in_dvc(cfg: OpsloopConfig, workspace: Workspace) -> str:
    """Record this run's outputs as dvc.yaml's stage results, so `dvc repro` finds them current.

    Only in a DVC project whose root is the workspace; params.yaml is regenerated from the exact
    config the pipeline ran with, so DVC sees the parameters that produced the outputs.
    """
    from opsloop.atomic import write_text_atomically
    from opsloop.config import config_to_yaml

    root = workspace.root
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return "skipped (the workspace is not a DVC project)"
    plain = dataclasses.replace(cfg, run_dir=None)  # the train stage passes run_dir itself
    write_text_atomically(workspace.params_file, GENERATED_CONFIG_HEADER + config_to_yaml(plain))
    command = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet"]
    done = subprocess.run(
        command, cwd=root, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
        logger.warning("dvc commit failed (%s); `dvc repro` will redo the stages", first)
        return f"failed: {first}"
    return "dvc.lock updated: `dvc repro` has nothing to redo"
