"""The `opsloop` command line: thin — parse, load config, call one stage, print the result.

Each command takes Hydra overrides after its name (`opsloop data data=mnist data.seed=1`).
Errors print one line `error: ...` and exit 2 (usage/config) or 1 (runtime); the traceback is
shown only with `--log-level debug`.

Why one file of ~700 lines: one short function per command, each parse -> call one stage ->
print; the length is the number of commands and their documented options, not logic.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import typer
from rich.console import Console

from opsloop import __version__
from opsloop.errors import ConfigError, OpsloopError, redact_text, redact_url

logger = logging.getLogger("opsloop")

app = typer.Typer(
    name="opsloop",
    help="The ML -> DEV -> OPS loop: data, training, registry, serving and monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: option help may say "[default: ...]", which Rich markup would swallow.
    rich_markup_mode=None,
)
console = Console()

OVERRIDES_HELP = "Hydra overrides, e.g. data=mnist data.val_fraction=0.2"
BUNDLE_OPTION_HELP = "Reference bundle [default: <workspace>/<registry.bundle_dir>/<model name>]."
LOG_OPTION_HELP = "Prediction-log URL [default: the server's, OPSLOOP_PREDLOG_URL]."


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _show_version(value: bool) -> None:
    if value:
        console.print(f"opsloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: LogLevel = typer.Option(
        LogLevel.info, "--log-level", "-l", help="Logging verbosity.", case_sensitive=False
    ),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """opsloop: versioned data, tracked training, gated registry, fast serving, drift monitoring."""
    configure_logging(log_level.value)
    # MLflow draws a progress bar for every artifact download (the registry fetches bundles);
    # in a CLI that logs its own progress they are noise. A user's explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def configure_logging(level: str) -> None:
    """Configure logging once, for the CLI process only (the library never configures it)."""
    handler = CurrentStderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (it may be swapped, e.g. by test capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # always follow sys.stderr


@app.command("data")
def data_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Prepare a dataset into data/processed/<name>/ (a no-op when nothing changed)."""
    from opsloop.config import load_config
    from opsloop.data import prepare_dataset

    cfg = load_config(overrides or [])
    result = prepare_dataset(cfg.data)
    print_fields(
        f"dataset {result.name}",
        {
            "path": str(result.path),
            "counts": ", ".join(f"{k}={v}" for k, v in result.counts.items()),
            "classes": str(result.manifest.num_classes),
            "image shape": "x".join(str(d) for d in result.manifest.image_shape),
            "content hash": result.content_hash,
            "status": "written" if result.written else "up to date, nothing rewritten",
        },
    )


@app.command("evaluate")
def evaluate_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    run_id: str | None = typer.Option(
        None,
        "--run-id",
        help="Evaluate this MLflow run's best checkpoint and log the report to it.",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Evaluate this checkpoint file (.ckpt)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Report directory [default: <workspace>/outputs/eval/<run or stem>]."
    ),
    split: str = typer.Option("test", "--split", help="The split to evaluate: train, val, test."),
) -> None:
    """Evaluate a model: metrics, calibration, robustness to corruptions, plots."""
    if (run_id is None) == (checkpoint is None):
        raise ConfigError(
            "give exactly one of --run-id or --checkpoint (see 'opsloop evaluate --help')"
        )
    from opsloop.config import load_config
    from opsloop.evaluate import default_out_dir, evaluate_model, evaluate_run

    cfg = load_config(overrides or [])
    if checkpoint is not None:
        name = checkpoint.stem
        out_dir = out or default_out_dir(cfg.workspace, cfg.output_dir, name)
        result = evaluate_model(checkpoint, cfg.data, out_dir=out_dir, seed=cfg.seed, split=split)
    else:
        assert run_id is not None  # exactly one of the two was given (checked above)
        name = run_id
        out_dir = out or default_out_dir(cfg.workspace, cfg.output_dir, name)
        result = evaluate_run(
            run_id,
            cfg.data,
            cfg.logger,
            workspace=Path(cfg.workspace),
            out_dir=out_dir,
            seed=cfg.seed,
            split=split,
        )
    worst = result.worst_corruption
    print_fields(
        f"evaluation of {name} on {cfg.data.name}/{split}",
        {
            "accuracy": f"{result.metrics['accuracy']:.4f}",
            "macro-F1": f"{result.metrics['macro_f1']:.4f}",
            "ECE": f"{result.metrics['ece']:.4f}",
            "worst corruption": f"{worst['corruption']} severity {worst['severity']}: "
            f"accuracy {worst['accuracy']:.4f} ({worst['delta']:+.4f})",
            "report": str(result.out_dir),
            **({"logged to run": run_id} if run_id is not None else {}),
        },
    )


@app.command("train")
def train_command(
    overrides: list[str] | None = typer.Argument(
        None, help="Hydra overrides, e.g. model=cnn_small trainer.max_epochs=5 logger=none"
    ),
) -> None:
    """Train a model on a prepared dataset and track the run (MLflow in ./mlflow.db by default)."""
    from opsloop.config import load_config
    from opsloop.train import train_model

    cfg = load_config(overrides or [])
    result = train_model(cfg)
    if not result.is_global_zero:
        return  # the extra DDP processes: the launching process reports the run
    metrics = result.metrics
    print_fields(
        "trained",
        {
            "run id": result.run_id or "- (logger=none)",
            "run dir": str(result.run_dir),
            "best checkpoint": str(result.best_checkpoint),
            "test acc": f"{metrics.get('test/acc', float('nan')):.4f}",
            "test f1": f"{metrics.get('test/f1', float('nan')):.4f}",
            "seconds": f"{result.seconds:.1f}",
            "tracking": redact_url(result.tracking_uri)
            if result.tracking_uri
            else "- (logger=none)",
        },
    )


@app.command("sweep")
def sweep_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    n_trials: int | None = typer.Option(
        None,
        "--n-trials",
        "-n",
        min=1,
        help="Trials this worker runs (default: sweep.n_trials). Workers sharing "
        "sweep.storage join one study.",
    ),
) -> None:
    """Tune hyperparameters with Optuna; save the best as configs/experiment/sweep_<study>.yaml."""
    from opsloop.config import load_config
    from opsloop.sweep import run_sweep

    cfg = load_config(overrides or [])
    result = run_sweep(cfg, n_trials=n_trials)
    print_fields(
        f"study {result.study_name}",
        {
            "best value": f"{result.metric}={result.best_value:.6g} "
            f"({result.direction}, trial {result.best_trial})",
            "best params": ", ".join(f"{k}={_short(v)}" for k, v in result.best_params.items()),
            "trials": f"{result.n_complete} complete, {result.n_pruned} pruned",
            "storage": result.storage,
            "parent run": result.parent_run_id or "none (logger=none)",
            "best config": str(result.best_config_path),
            "train it": f"opsloop train experiment=sweep_{result.study_name}",
            "trials table": str(result.trials_csv),
            "time": f"{result.seconds:.1f} s",
        },
    )


@app.command("config")
def config_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    out: Path | None = typer.Option(
        None, "--out", help="Write the YAML here (e.g. params.yaml for DVC) instead of printing."
    ),
) -> None:
    """Show the resolved config that a stage would run with."""
    from opsloop.atomic import write_text_atomically
    from opsloop.config import config_to_yaml, load_config
    from opsloop.workspace import GENERATED_CONFIG_HEADER

    text = config_to_yaml(load_config(overrides or []))
    if out is None:
        console.print(text, soft_wrap=True, highlight=False, markup=False, end="")
        return
    write_text_atomically(out, GENERATED_CONFIG_HEADER + text)


@app.command("register")
def register_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    run_id: str = typer.Option(..., "--run-id", help="The training run whose model to register."),
    alias: str = typer.Option("challenger", "--alias", help="Alias to point at the new version."),
) -> None:
    """Register a run's model as a new version of registry.model_name, with its bundle attached.

    The new version gets the alias `challenger` (or --alias); `opsloop promote` then gates it.
    """
    from opsloop.config import load_config
    from opsloop.pipeline import register_run

    cfg = load_config(overrides or [])
    info, exported = register_run(cfg, run_id, alias=alias or None)
    print_fields(
        f"registered {info.name} v{info.version}",
        {
            "run id": run_id,
            "aliases": ", ".join(info.aliases) or "-",
            "bundle": f"{exported.path} (attached to the version)",
            "promote it": f"opsloop promote --version {info.version}",
        },
    )


@app.command("promote")
def promote_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    model: str | None = typer.Option(
        None, "--model", help="Registered model name [default: registry.model_name]."
    ),
    version: str | None = typer.Option(
        None, "--version", help="The version to promote [default: the `challenger` alias]."
    ),
    force: bool = typer.Option(False, "--force", help="Skip the gate (recorded as forced)."),
    live_labels: int | None = typer.Option(
        None,
        "--live-labels",
        min=0,
        help="Also require live evidence: this many labelled shadow/canary answers "
        "[default: registry.live_min_labels; 0 = off].",
    ),
    log: str | None = typer.Option(
        None, "--log", help="Prediction log with the live answers [default: the server's]."
    ),
) -> None:
    """Move `champion` to a version if it passes the gate: holdout accuracy and latency, and
    with --live-labels, live accuracy in shadow or canary."""
    import dataclasses

    from opsloop.config import load_config
    from opsloop.registry import promote_model
    from opsloop.tracking import resolve_tracking_uri
    from opsloop.workspace import Workspace

    cfg = load_config(overrides or [])
    if live_labels is not None:
        cfg = dataclasses.replace(
            cfg, registry=dataclasses.replace(cfg.registry, live_min_labels=live_labels)
        )
    workspace = Workspace(Path(cfg.workspace))
    decision = promote_model(
        model or cfg.registry.model_name,
        cfg.registry,
        cfg.data,
        resolve_tracking_uri(cfg.logger, workspace.root),
        cache_dir=workspace.bundle_cache,
        version=version,
        force=force,
        evidence=_evidence_source(log) if cfg.registry.live_min_labels > 0 else None,
    )
    verdict = "promoted" if decision.promoted else "not promoted"
    print_fields(
        f"{decision.name} v{decision.challenger_version}: {verdict}",
        {
            "reason": decision.reason,
            "challenger accuracy": _optional(decision.challenger_accuracy),
            "champion": f"v{decision.champion_version} accuracy "
            f"{_optional(decision.champion_accuracy)}"
            if decision.champion_version
            else "none",
            "latency": f"{_optional(decision.challenger_latency_ms)} ms "
            f"(budget {decision.latency_budget_ms:g} ms)",
            "holdout": decision.holdout,
            "forced": str(decision.forced).lower(),
        },
    )


def _play_scenario(
    name: str,
    scale: float,
    url: str,
    bundle: Path | None,
    data: Path | None,
    overrides: list[str],
    seed: int,
) -> None:
    from opsloop.data import load_split
    from opsloop.monitor.scenario import get_scenario, run_scenario, split_pool
    from opsloop.monitor.simulate import replay_sources

    scenario = get_scenario(name).scaled(scale)
    loaded, data_dir = replay_sources(bundle, data, overrides)
    test = load_split(data_dir, "test")
    (images, labels), _held = split_pool(test.images, test.labels, scenario.holdout_fraction, seed)
    manifest = loaded.manifest
    timeline = run_scenario(
        scenario,
        url,
        images,
        labels,
        model_name=manifest.model_name,
        input_name=manifest.input.name,
        pixel_max=manifest.preprocessing.pixel_max,
        seed=seed,
    )
    shift = timeline.shift_at
    end = shift + scenario.shift_seconds
    versions = sorted({a.model_version for a in timeline.answers if a.model_version})
    print_fields(
        f"scenario {scenario.name}: {scenario.description}",
        {
            "requests": f"{len(timeline.answers)} ({timeline.failed} failed)",
            "labels": f"{timeline.labels_posted} posted after {scenario.label_delay_seconds:g} s",
            "clean accuracy": _optional(timeline.accuracy(0, shift)),
            "shifted accuracy": _optional(timeline.accuracy(shift, end)),
            "last minute": _optional(timeline.accuracy(max(shift, end - 60), end)),
            "versions": ", ".join(versions),
        },
    )
    if timeline.failed:
        raise typer.Exit(1)


def _evidence_source(log: str | None) -> Any:
    """Live evidence read from the prediction log (`--log`, else the server's)."""
    from opsloop.monitor.quality import live_evidence
    from opsloop.predictions import default_log_url

    url = log or default_log_url()
    return lambda challenger, champion: live_evidence(url, challenger, champion)


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


models_app = typer.Typer(help="List registered models and show a version's lineage.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Every registered model with its versions and aliases."""
    from opsloop.config import load_config
    from opsloop.registry import list_models
    from opsloop.tracking import resolve_tracking_uri

    cfg = load_config(overrides or [])
    models = list_models(resolve_tracking_uri(cfg.logger, Path(cfg.workspace)))
    if not models:
        console.print("no registered models; run `opsloop pipeline` or `opsloop register`")
    for name, versions in models.items():
        print_fields(
            name,
            {
                f"v{v.version}": f"{', '.join(v.aliases) or '-'}  run {v.run_id}  {v.created_at}"
                for v in versions
            },
        )


@models_app.command("show")
def models_show_command(
    ref: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION or NAME (= NAME@champion)."),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Lineage, metrics and promotion history of one model version."""
    from opsloop.config import load_config
    from opsloop.registry import describe_model
    from opsloop.tracking import resolve_tracking_uri

    cfg = load_config(overrides or [])
    description = describe_model(ref, resolve_tracking_uri(cfg.logger, Path(cfg.workspace)))
    info, lineage = description.version, description.lineage
    print_fields(
        f"{info.name} v{info.version} ({', '.join(info.aliases) or 'no alias'})",
        {
            "run id": info.run_id or "-",
            "git commit": lineage.get("git_commit", "unknown")
            + (" (dirty)" if lineage.get("git_dirty") == "true" else ""),
            "dataset": f"{lineage.get('dataset_name', '?')} {lineage.get('dataset_hash', '?')}",
            "config hash": lineage.get("config_hash", "unknown"),
            "seed": lineage.get("seed", "unknown"),
            "registered": info.created_at,
            "bundle": info.tags.get("opsloop.bundle_artifact", "none"),
            **{
                key: f"{value:.4f}"
                for key, value in sorted(description.metrics.items())
                if key.startswith(("test/", "eval/"))
            },
        },
    )
    for event in description.history:
        kind = "forced" if event.get("forced") else "gated"
        outcome = "promoted" if event.get("promoted") else "refused"
        console.print(
            f"  promotion  {event.get('at')} by {event.get('by')}: {outcome} ({kind}) — "
            f"{event.get('reason')}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


@app.command("export")
def export_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Export this .ckpt file."),
    run_id: str | None = typer.Option(None, "--run-id", help="Export this run's best checkpoint."),
    model: str | None = typer.Option(
        None, "--model", help="Materialise a registered version's bundle: NAME@ALIAS or NAME/N."
    ),
    out: Path = typer.Option(..., "--out", help="The bundle directory to write."),
    quantize: bool = typer.Option(False, "--quantize", help="Serve a dynamic int8 model."),
) -> None:
    """Write a verified model bundle (ONNX + bundle.json + reference data + model card)."""
    if sum(x is not None for x in (checkpoint, run_id, model)) != 1:
        raise ConfigError("give exactly one of --checkpoint, --run-id or --model")
    from opsloop.config import load_config

    cfg = load_config(overrides or [])
    if model is not None:
        from opsloop.registry import download_bundle
        from opsloop.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.logger, Path(cfg.workspace))
        bundle, info = download_bundle(model, uri, out)
        path, version, quantized = bundle.path, info.version, bundle.manifest.quantization
    else:
        from opsloop.export import export_bundle, export_run

        if checkpoint is not None:
            result = export_bundle(
                checkpoint, cfg.data, out, model_name=cfg.registry.model_name, quantize=quantize
            )
        else:
            assert run_id is not None  # exactly one source was given (checked above)
            result = export_run(run_id, cfg, out, quantize=quantize)
        path, version, quantized = result.path, None, result.quantization
    print_fields(
        f"bundle {path}",
        {
            "version": version or "unregistered",
            "files": ", ".join(sorted(p.name for p in path.iterdir())),
            "quantization": "none"
            if not quantized
            else f"int8 accuracy delta {quantized['accuracy_delta']:+.4f}, "
            f"{quantized['fp32_bytes']} -> {quantized['int8_bytes']} bytes",
        },
    )


@app.command("pipeline")
def pipeline_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    promote: bool = typer.Option(
        True, "--promote/--no-promote", help="Gate and promote (default), or stop at export."
    ),
    outputs: Path | None = typer.Option(
        None, "--outputs", help="Write the run, report and bundle here, not dvc.yaml's places."
    ),
) -> None:
    """data -> train -> evaluate -> register -> export -> promote, with a summary table."""
    from rich.table import Table

    from opsloop.config import load_config
    from opsloop.pipeline import run_pipeline

    cfg = load_config(overrides or [])
    result = run_pipeline(cfg, promote=promote, outputs=outputs)
    table = Table(title="opsloop pipeline", title_justify="left")
    for column in ("stage", "seconds", "result"):
        table.add_column(column, overflow="fold")
    for stage in result.stages:
        table.add_row(stage.name, f"{stage.seconds:.1f}", stage.detail)
    table.add_row("total", f"{result.seconds:.1f}", "")
    console.print(table)
    print_fields(
        "summary",
        {
            "accuracy": f"{result.accuracy:.4f}",
            "model version": f"{result.model_name} v{result.model_version}",
            "alias": "champion"
            if result.promoted
            else "challenger" + (" (gate refused)" if promote else " (not gated)"),
            "champion": f"v{result.champion_version}" if result.champion_version else "unchanged",
            "bundle": str(result.bundle_path),
            "serve it": f"{_launcher()}opsloop serve   (serves {result.model_name}@champion)",
        },
    )


def _launcher() -> str:
    """`uv run ` when this process was started by `uv run` (as `make run` does), else nothing.

    Such a user never activated the project's virtual environment, so a bare `opsloop` is not on
    their shell's PATH; uv marks the processes it runs with the `UV` variable.
    """
    import os

    return "uv run " if os.environ.get("UV") else ""


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command("serve")
def serve_command(
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Serve this bundle directory [env OPSLOOP_BUNDLE_PATH]."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Serve the registry's NAME@ALIAS [default: digits-cnn@champion]."
    ),
    host: str | None = typer.Option(None, "--host", help="Interface [env OPSLOOP_HOST]."),
    port: int | None = typer.Option(None, "--port", help="TCP port [env OPSLOOP_PORT]."),
    workers: int | None = typer.Option(
        None, "--workers", help="Worker processes, about one per core [env OPSLOOP_WORKERS]."
    ),
) -> None:
    """Serve a model over HTTP: Open Inference Protocol (V2), /predict, /metrics, /docs.

    Every setting is an OPSLOOP_* environment variable (see docs/serving.md); options win.
    """
    from opsloop.serve.server import run_server
    from opsloop.serve.settings import load_settings

    overrides: dict[str, Any] = {"bundle_path": bundle, "host": host, "port": port}
    overrides |= {"workers": workers, "log_level": _service_log_level("OPSLOOP_LOG_LEVEL")}
    if model is not None:
        name, _, alias = model.partition("@")
        overrides |= {"model_name": name, "model_alias": alias or "champion", "bundle_path": None}
    run_server(load_settings(**{k: v for k, v in overrides.items() if v is not None}))


@app.command("ui")
def ui_command(
    host: str | None = typer.Option(None, "--host", help="Interface [env OPSLOOP_UI_HOST]."),
    port: int | None = typer.Option(None, "--port", help="TCP port [env OPSLOOP_UI_PORT, 8501]."),
    server: str | None = typer.Option(
        None, "--server", help="Inference server URL [env OPSLOOP_UI_SERVER_URL, :8000]."
    ),
) -> None:
    """Open the app in a browser: predict, models, monitoring and the loop (Streamlit).

    Every setting is an OPSLOOP_UI_* environment variable (see docs/tour.md); options win.
    """
    from opsloop.ui.launch import run_ui
    from opsloop.ui.settings import load_ui_settings

    options: dict[str, Any] = {"host": host, "port": port, "server_url": server}
    options["log_level"] = _service_log_level("OPSLOOP_UI_LOG_LEVEL")
    run_ui(load_ui_settings(**{k: v for k, v in options.items() if v is not None}))


loop_app = typer.Typer(
    help="The closed loop: retrain on production data when the champion gets worse.",
    no_args_is_help=True,
)
app.add_typer(loop_app, name="loop")


@loop_app.command("serve")
def loop_serve_command(
    host: str | None = typer.Option(None, "--host", help="Interface [env OPSLOOP_LOOP_HOST]."),
    port: int | None = typer.Option(None, "--port", help="TCP port [env OPSLOOP_LOOP_PORT, 8002]."),
) -> None:
    """Run the controller: a decision every interval, Alertmanager's webhook on /alerts.

    Every setting is an OPSLOOP_LOOP_* environment variable (see docs/loop.md); options win.
    """
    from opsloop.loop.app import run_loop_service
    from opsloop.loop.settings import load_loop_settings

    options: dict[str, Any] = {"host": host, "port": port}
    options["log_level"] = _service_log_level("OPSLOOP_LOOP_LOG_LEVEL")
    run_loop_service(load_loop_settings(**{k: v for k, v in options.items() if v is not None}))


@loop_app.command("run")
def loop_run_command(
    once: bool = typer.Option(True, "--once", help="One decision, then exit (the only mode)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Decide and record, run nothing."),
    reason: str | None = typer.Option(
        None, "--reason", help="Ask for a run by hand (a manual trigger; limits still apply)."
    ),
) -> None:
    """One decision now: gather the evidence, check the limits, run (and wait) or say why not."""
    from opsloop.loop.controller import Controller
    from opsloop.loop.settings import load_loop_settings
    from opsloop.loop.triggers import MANUAL, Trigger

    del once  # a service that keeps deciding is `opsloop loop serve`
    controller = Controller(load_loop_settings())
    try:
        request = Trigger(MANUAL, reason) if reason else None
        decision = controller.step(request, dry_run=dry_run, wait=True)
        fields = {"decision": decision.reason}
        if decision.trigger is not None:
            fields["trigger"] = f"{decision.trigger.kind}: {decision.trigger.reason}"
        if decision.run_id is not None:
            run = controller.history.get(decision.run_id)
            fields |= _describe_run(run)
        title = (
            "ran"
            if decision.run
            else "would run (dry run)"
            if decision.would_run
            else "not running"
        )
        print_fields(f"loop: {title}", fields)
    finally:
        controller.close()


@loop_app.command("retrain")
def loop_retrain_command(
    run: int = typer.Option(..., "--run", help="The loop run (its row in the loop database)."),
) -> None:
    """Do one loop run's work (the runner starts this): data, pipeline, gate, publish."""
    from opsloop.loop.retrain import retrain
    from opsloop.loop.settings import load_loop_settings

    record = retrain(load_loop_settings(), run)
    print_fields(f"loop run {record.id}: {record.state}", _describe_run(record))
    if record.state not in ("succeeded", "refused"):
        raise typer.Exit(1)


@loop_app.command("history")
def loop_history_command(
    limit: int = typer.Option(20, "--limit", min=1, help="How many runs, newest first."),
) -> None:
    """Every loop run: trigger, evidence, data version, MLflow run, gate decision, promotion."""
    from datetime import UTC, datetime

    from opsloop.loop.history import History
    from opsloop.loop.settings import load_loop_settings

    history = History(load_loop_settings().resolved_db_url())
    try:
        runs = history.recent(limit)
    finally:
        history.dispose()
    if not runs:
        console.print("no loop runs yet; `opsloop loop run --once` takes the first decision")
    for run in runs:
        when = datetime.fromtimestamp(run.created_at, UTC).isoformat(timespec="seconds")
        print_fields(f"run {run.id}  {when}  {run.trigger} -> {run.state}", _describe_run(run))


def _describe_run(run: Any) -> dict[str, str]:
    fields = {"why": run.reason}
    if run.data_hash:
        fields["data version"] = f"{run.data_name} {run.data_hash[:12]} ({run.labels} labels)"
    if run.mlflow_run_id:
        fields["mlflow run"] = run.mlflow_run_id
    if run.model_version:
        fields["model"] = f"v{run.model_version} (champion before: v{run.champion_before})"
    if run.decision:
        fields["gate"] = run.decision
    if run.promoted is not None:
        fields["promoted"] = str(bool(run.promoted)).lower()
    if run.error:
        fields["error"] = run.error
    return fields


@app.command("trace")
def trace_command(
    request_id: str = typer.Argument(
        ..., help="The request's id (V2 `id`, /predict's request_id)."
    ),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    log: str | None = typer.Option(None, "--log", help=LOG_OPTION_HELP),
) -> None:
    """Trace one prediction: model version -> MLflow run -> git commit -> data -> config, label."""
    from datetime import UTC, datetime

    from opsloop.config import load_config
    from opsloop.predictions import default_log_url
    from opsloop.trace import trace_request
    from opsloop.tracking import resolve_tracking_uri

    cfg = load_config(overrides or [])
    uri = resolve_tracking_uri(cfg.logger, Path(cfg.workspace))
    trace = trace_request(request_id, log or default_log_url(), uri)
    for answer in trace.answers:
        lineage = answer.lineage
        when = datetime.fromtimestamp(answer.created_at, UTC).isoformat(timespec="seconds")
        dirty = " (dirty)" if lineage.git_dirty else ""
        print_fields(
            f"{request_id} item {answer.item}: {answer.role} answer",
            {
                "answered": f"class {answer.predicted} (confidence {answer.confidence:.3f}) at "
                f"{when}",
                "model": f"{answer.model_name} v{answer.model_version}",
                "mlflow run": lineage.run_id or "-",
                "git commit": f"{lineage.git_commit or '-'}{dirty}",
                "dataset": f"{lineage.dataset or '-'} {lineage.dataset_hash or ''}".strip(),
                "config hash": lineage.config_hash or "-",
                "label": "none yet" if answer.label is None else str(answer.label),
                **({"note": lineage.note} if lineage.note else {}),
            },
        )
    changes = [e for e in trace.labels if len([x for x in trace.labels if x.item == e.item]) > 1]
    for event in changes:
        when = datetime.fromtimestamp(event.created_at, UTC).isoformat(timespec="seconds")
        console.print(
            f"  label history  item {event.item}: {event.label} at {when}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


monitor_app = typer.Typer(
    help="Drift monitoring: one check now, or a service that keeps checking.",
    no_args_is_help=True,
)
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("check")
def monitor_check_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    bundle: Path | None = typer.Option(None, "--bundle", help=BUNDLE_OPTION_HELP),
    log: str | None = typer.Option(None, "--log", help=LOG_OPTION_HELP),
    last: int | None = typer.Option(
        None, "--last", min=1, help="The last N predictions [default: 200 without --since]."
    ),
    since: float | None = typer.Option(
        None, "--since", min=0, help="Only predictions of the last SECONDS seconds."
    ),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level after correction."),
    min_samples: int = typer.Option(
        30, "--min-samples", min=1, help="Refuse windows with fewer predictions."
    ),
    accuracy_last: int = typer.Option(
        1000, "--accuracy-last", min=1, help="Answers whose labels make the online accuracy."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON report."),
    html: Path | None = typer.Option(None, "--html", help="Also write Evidently's HTML report."),
) -> None:
    """Check recent predictions for drift, and the online accuracy where labels arrived, once."""
    from opsloop.monitor.service import check_once, quality_once, resolve_sources

    bundle_dir, log_url = resolve_sources(bundle, log, overrides or [])
    report = check_once(
        bundle_dir,
        log_url,
        last=last,
        since_seconds=since,
        alpha=alpha,
        min_samples=min_samples,
        html=html,
    )
    quality = quality_once(
        bundle_dir, log_url, last=accuracy_last, since_seconds=since, min_samples=min_samples
    )
    if as_json:
        typer.echo(orjson.dumps(report.to_dict() | {"quality": quality.to_dict()}).decode())
        return
    print_fields(
        "drift detected" if report.drift else "no drift",
        {
            "window": f"{report.window_size} predictions, {report.time_range[0]} .. "
            f"{report.time_range[1]}",
            "model versions": ", ".join(f"{v} ({n})" for v, n in report.model_versions.items())
            + (" (mixed)" if report.mixed_versions else ""),
            "reference": f"{report.reference_size} examples of {bundle_dir}",
            **{d.name: d.describe() for d in report.detectors},
            "decision": f"{report.correction} correction, alpha {report.alpha}; "
            f"fired: {', '.join(report.fired) or 'none'}",
            **({"html report": str(html)} if html is not None else {}),
        },
    )
    print_fields(
        f"online quality of the last {quality.window_size} answers",
        describe_quality(quality),
    )


@monitor_app.command("serve")
def monitor_serve_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    bundle: Path | None = typer.Option(None, "--bundle", help=BUNDLE_OPTION_HELP),
    log: str | None = typer.Option(None, "--log", help=LOG_OPTION_HELP),
    host: str | None = typer.Option(
        None, "--host", help="Interface [env OPSLOOP_MONITOR_HOST, 127.0.0.1]."
    ),
    port: int | None = typer.Option(
        None, "--port", help="TCP port [env OPSLOOP_MONITOR_PORT, 8001]."
    ),
    interval: float | None = typer.Option(
        None,
        "--interval",
        help="Seconds between checks [env OPSLOOP_MONITOR_INTERVAL_SECONDS, 60].",
    ),
    last: int | None = typer.Option(
        None, "--last", min=1, help="Predictions per check [env OPSLOOP_MONITOR_WINDOW, 200]."
    ),
    since: float | None = typer.Option(
        None, "--since", min=0, help="Only the last SECONDS [env OPSLOOP_MONITOR_WINDOW_SECONDS]."
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Significance level [env OPSLOOP_MONITOR_ALPHA, 0.05]."
    ),
    min_samples: int | None = typer.Option(
        None, "--min-samples", min=1, help="Smallest window checked [env ..._MIN_SAMPLES, 30]."
    ),
) -> None:
    """Keep checking every interval; serve /metrics, /drift and /drift/report.

    Every setting is also an OPSLOOP_MONITOR_* environment variable; options win.
    """
    from opsloop.monitor.app import run_monitor_service
    from opsloop.monitor.settings import load_monitor_settings

    options: dict[str, Any] = {"host": host, "port": port, "interval_seconds": interval}
    options |= {"window": last, "window_seconds": since, "bundle_path": bundle}
    options |= {"predlog_url": log, "alpha": alpha, "min_samples": min_samples}
    options["log_level"] = _service_log_level("OPSLOOP_MONITOR_LOG_LEVEL")
    settings = load_monitor_settings(**{k: v for k, v in options.items() if v is not None})
    run_monitor_service(settings, overrides or [])


def describe_quality(quality: Any) -> dict[str, str]:
    """One line per model version and role, one per challenger comparison and estimate."""
    lines: dict[str, str] = {}
    for version in quality.versions:
        accuracy = version.accuracy
        measured = (
            "no labels yet"
            if accuracy is None
            else f"accuracy {accuracy.value:.3f} (95% {accuracy.lower:.3f}..{accuracy.upper:.3f}) "
            f"on {version.labelled} labels"
        )
        delay = version.label_delay_seconds
        lines[f"v{version.model_version} {version.role}"] = (
            f"{measured}; {version.predictions} answers, coverage {version.label_coverage:.0%}"
            + ("" if delay is None else f", label delay {delay:.1f} s")
            + f", p95 {version.latency_ms_p95:.1f} ms"
        )
    for c in quality.comparisons:
        lines[f"v{c.challenger_version} {c.challenger_role} vs v{c.champion_version}"] = (
            f"{c.difference:+.3f} (95% {c.lower:+.3f}..{c.upper:+.3f}, p={c.p_value:.3g})"
        )
    for estimate in quality.estimates:
        lines[f"v{estimate.model_version} estimate"] = (
            f"{estimate.value:.3f} ESTIMATED without labels ({estimate.method}, "
            f"{estimate.window_size} answers)"
        )
    return lines or {"window": "no answers logged yet"}


def _service_log_level(variable: str) -> str | None:
    """The CLI's --log-level for a service, unless its own variable sets one (then None)."""
    import os

    if variable in os.environ:
        return None
    return logging.getLevelName(logging.getLogger().level).lower()


@app.command("simulate")
def simulate_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The server to send to."),
    rate: float = typer.Option(20.0, "--rate", help="Requests per second."),
    clean: int = typer.Option(200, "--clean", min=0, help="Clean requests, sent first."),
    corrupted: int = typer.Option(200, "--corrupted", min=0, help="Corrupted requests, then."),
    corruption: str = typer.Option("gaussian_noise", "--corruption", help="Corruption name."),
    severity: int = typer.Option(3, "--severity", help="Corruption severity: 1, 2 or 3."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per request."),
    max_seconds: float = typer.Option(600.0, "--max-seconds", help="Stop after this long."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image order and the corruption."),
    model: str | None = typer.Option(
        None, "--model", help="Model name in the URL (default: the bundle's)."
    ),
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Bundle (default: <workspace>/bundles/<model name>)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Processed dataset whose test split is replayed (default: config's)."
    ),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a target that is not on this machine."
    ),
    scenario: str | None = typer.Option(
        None,
        "--scenario",
        help="Play a story instead: clean traffic, a shift that hurts, labels posted after a "
        "delay (rotation, blur, contrast).",
    ),
    scale: float = typer.Option(
        1.0, "--scale", min=0.01, help="With --scenario: stretch or shorten its phases."
    ),
) -> None:
    """Replay held-out images, clean then corrupted, against a running server at a steady rate."""
    from opsloop.monitor.simulate import TrafficPlan, run_simulation

    # httpx logs every request at INFO: at tens of requests a second that drowns the summary.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    if scenario is not None:
        _play_scenario(scenario, scale, url, bundle, data, overrides or [], seed)
        return
    plan = TrafficPlan(
        url=url,
        model_name=model,
        clean=clean,
        corrupted=corrupted,
        corruption=corruption,
        severity=severity,
        rate=rate,
        batch=batch,
        max_seconds=max_seconds,
        seed=seed,
        allow_remote=allow_remote,
    )
    plan.check()  # before loading anything: a bad plan fails fast
    result, source = run_simulation(plan, bundle, data, overrides or [])
    print_fields(
        "traffic sent" if not result.failed else f"traffic sent, {result.failed} requests failed",
        {
            "target": url,
            "images": source,
            **{phase.name: phase.describe() for phase in result.phases},
            "took": f"{result.seconds:.1f}s ({result.rate:.1f} requests/s)"
            + (" - stopped at --max-seconds" if result.stopped_early else ""),
            "corruption": f"{corruption} severity {severity}" if corrupted else "none",
        },
    )
    if result.failed:
        raise typer.Exit(1)


def print_fields(title: str, fields: dict[str, str]) -> None:
    """A stage's result as aligned `key  value` lines: readable, and never wrapped mid-value."""
    width = max(len(key) for key in fields)
    console.print(title, style="bold", soft_wrap=True, highlight=False)
    for key, value in fields.items():
        console.print(f"  {key:<{width}}  {value}", soft_wrap=True, highlight=False, markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the app and turn every failure into one line and an exit code."""
    command = typer.main.get_command(app)
    debug = _wants_debug(sys.argv[1:] if argv is None else list(argv))
    try:
        result = command.main(
            args=None if argv is None else list(argv), prog_name="opsloop", standalone_mode=False
        )
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        _fail("aborted")
        return 130
    except typer.TyperException as exc:  # Typer's (vendored) click usage and parameter errors
        _fail(_usage_message(exc))
        return int(getattr(exc, "exit_code", 2))
    except OpsloopError as exc:
        if debug:
            logger.exception("failed")
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # an unexpected bug: still one line unless debugging
        if debug:
            logger.exception("unexpected failure")
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --log-level debug for details)")
        return 1
    return result if isinstance(result, int) else 0


def _usage_message(exc: Exception) -> str:
    """The error text plus where to look for help, naming the (sub)command."""
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "opsloop"
    return f"{message} (see '{path} --help')"


def _fail(message: str) -> None:
    # The last line of defence: whatever an error quotes, no URL password reaches the terminal.
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"error: {' '.join(redact_text(message).split())}", markup=False
    )


def _wants_debug(args: Sequence[str]) -> bool:
    joined = " ".join(args).lower()
    return "--log-level debug" in joined or "--log-level=debug" in joined or "-l debug" in joined
