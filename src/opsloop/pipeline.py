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
from typing import Any, TypeVar

from opsloop.config import OpsloopConfig
from opsloop.errors import ConfigError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PipelinePaths:
    """Where each stage writes: the outs that dvc.yaml declares."""

    run_dir: Path
    evaluation: Path
    candidate: Path

    @classmethod
    def under(cls, workspace: Path) -> PipelinePaths:
        return cls(
            run_dir=workspace / "models" / "latest",
            evaluation=workspace / "reports" / "evaluation",
            candidate=workspace / "bundles" / "candidate",
        )


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


def run_pipeline(cfg: OpsloopConfig) -> PipelineResult:
    """Run every stage with `cfg`; the registry and bundles live in the tracking store."""
    from opsloop.data import prepare_dataset
    from opsloop.evaluate import evaluate_run
    from opsloop.export import export_bundle
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
    workspace = Path(cfg.workspace)
    uri = resolve_tracking_uri(cfg.logger, workspace)
    name = cfg.registry.model_name
    stages: list[StageTiming] = []
    # The same output paths as dvc.yaml's stages, so `dvc commit` can record this run.
    paths = PipelinePaths.under(workspace)
    if cfg.run_dir is None:
        cfg = dataclasses.replace(cfg, run_dir=str(paths.run_dir))

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
            workspace=workspace,
            out_dir=paths.evaluation,
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
            paths.candidate,
            model_name=name,
            model_version=version.version,
            lineage=_lineage(run_lineage(run_id, uri), run_id),
            metrics=_bundle_metrics(trained.metrics, evaluation.metrics),
            evaluation={"per_class": evaluation.per_class, "robustness": evaluation.robustness},
            quantize=cfg.registry.quantize,
        ),
        lambda result: f"{result.path} (parity {result.parity_max_abs_diff:.1e})",
    )
    attach_bundle(version, exported.path, uri)
    decision = timed(
        stages,
        "promote",
        lambda: promote_model(
            name, cfg.registry, cfg.data, uri, cache_dir=workspace / ".opsloop" / "bundles"
        ),
        lambda d: ("promoted" if d.promoted else "refused") + f": {d.reason}",
    )
    served = workspace / cfg.registry.bundle_dir / name
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


def _require_run_id(run_id: str | None) -> str:
    if run_id is None:
        raise ConfigError("training produced no MLflow run; the pipeline needs logger=mlflow")
    return run_id


def _describe_data(result: Any) -> str:
    status = "written" if result.written else "unchanged"
    return f"{result.path} ({status}, {result.content_hash[:12]})"


def _describe_training(result: Any) -> str:
    return f"run {result.run_id}, test acc {result.metrics.get('test/acc', float('nan')):.4f}"


def _lineage(tags: Mapping[str, str], run_id: str) -> dict[str, Any]:
    keys = ("git_commit", "dataset_name", "dataset_hash", "config_hash")
    lineage: dict[str, Any] = {key: tags[key] for key in keys if key in tags}
    lineage["run_id"] = run_id
    if "git_dirty" in tags:
        lineage["git_dirty"] = tags["git_dirty"] == "true"
    if tags.get("seed", "").isdigit():
        lineage["seed"] = int(tags["seed"])
    return lineage


def _bundle_metrics(
    train: Mapping[str, float], evaluation: Mapping[str, float]
) -> dict[str, float]:
    metrics = {key: float(value) for key, value in train.items() if key.startswith("test/")}
    metrics |= {f"eval/{key}": float(value) for key, value in evaluation.items()}
    return metrics


def record_in_dvc(cfg: OpsloopConfig, workspace: Path) -> str:
    """Record this run's outputs as dvc.yaml's stage results, so `dvc repro` finds them current.

    Only in a DVC project whose root is the workspace; params.yaml is regenerated from the exact
    config the pipeline ran with, so DVC sees the parameters that produced the outputs.
    """
    from opsloop.atomic import write_text_atomically
    from opsloop.config import config_to_yaml

    if not (workspace / "dvc.yaml").is_file() or not (workspace / ".dvc").is_dir():
        return "skipped (the workspace is not a DVC project)"
    header = "# Generated by `opsloop config` from configs/: edit those, not this file.\n"
    plain = dataclasses.replace(cfg, run_dir=None)  # the train stage passes run_dir itself
    write_text_atomically(workspace / "params.yaml", header + config_to_yaml(plain))
    command = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet"]
    done = subprocess.run(
        command, cwd=workspace, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
        logger.warning("dvc commit failed (%s); `dvc repro` will redo the stages", first)
        return f"failed: {first}"
    return "dvc.lock updated: `dvc repro` has nothing to redo"
