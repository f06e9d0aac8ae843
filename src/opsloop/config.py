"""Typed experiment configuration: dataclass schemas, Hydra composition, one-line errors.

Each config group under `configs/` has a dataclass schema here. `load_config(["data=mnist"])`
composes `configs/config.yaml` with Hydra, validates it against the schema (an unknown key or a
wrong type fails with the key's name) and returns the typed `OpsloopConfig`. Stage functions then
receive only their own typed section, never a raw DictConfig.

Why one file of ~500 lines: the schemas and every check on them belong together, so that
`opsloop config` rejects exactly what a stage would; it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsloop.errors import ConfigError

CONFIG_DIR_ENV = "OPSLOOP_CONFIG_DIR"
# Registries of what a config may name, each the one place a new choice is added. Values are
# `module:attribute` paths, imported only by the stage that builds the object (torch and Lightning
# stay out of config loading). Datasets are registered in `opsloop.data.sources.SOURCES`.
MODELS = {"cnn": "opsloop.model:ConvNet"}
PROFILERS = {
    "simple": "lightning.pytorch.profilers:SimpleProfiler",
    "advanced": "lightning.pytorch.profilers:AdvancedProfiler",
    "pytorch": "lightning.pytorch.profilers:PyTorchProfiler",
}
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "onecycle", "step", "none")
LOGGERS = ("mlflow", "wandb", "none")
PARAM_TYPES = ("float", "int", "categorical")
# Study names become file names (`sweep_<study>.yaml`) and Hydra option names.
STUDY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class DownloadFileConfig:
    """One file of a downloadable dataset: its name on the mirror and its SHA-256."""

    filename: str = "???"
    sha256: str = "???"


@dataclass
class DataConfig:
    """Which dataset to prepare, how to split it and how to load it for training."""

    name: str = "digits"
    # The loader: `digits` (scikit-learn), `idx` (MNIST-style download), `imagefolder`.
    source: str = "digits"
    processed_dir: str = "data/processed"
    cache_dir: str = "data/raw"
    seed: int = 0
    val_fraction: float = 0.15
    # Used only where the source has no official test split (digits, imagefolder).
    test_fraction: float = 0.15
    class_names: list[str] | None = None
    # idx: mirrors tried in order, and the four files with their checksums.
    mirrors: list[str] = field(default_factory=list)
    files: dict[str, DownloadFileConfig] = field(default_factory=dict)
    retries: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    # imagefolder: root/<class>/*.png|jpg; images are converted to `channels` and resized.
    root: str | None = None
    image_size: int | None = None
    channels: int = 1
    # production: the processed dataset `base` (under processed_dir) plus the labelled answers of
    # the prediction log (`predlog_url`, default the server's); the newest `holdout_fraction` of
    # them becomes the test split, so a model is judged on the world as it is now.
    base: str | None = None
    base_dir: str | None = None  # where `base` is prepared (default: processed_dir)
    predlog_url: str | None = None
    holdout_fraction: float = 0.3
    min_labels: int = 50
    # Only labels that had arrived by this Unix time: a snapshot that reads the same however
    # often it is prepared (the loop pins it when a run starts). None: every label so far.
    labels_until: float | None = None
    # Loading for training (the LightningDataModule).
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class ModelConfig:
    """The classifier: a small CNN that adapts to any image shape and class count."""

    name: str = "cnn"  # a key of MODELS
    channels: int = 32  # width of the first conv block; each further block doubles it
    depth: int = 2  # conv blocks
    hidden: int = 128  # width of the penultimate layer, the embedding monitoring uses
    dropout: float = 0.1


@dataclass
class OptimConfig:
    """Loss, optimizer and learning-rate schedule."""

    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | onecycle | step | none
    warmup_epochs: int = 0
    label_smoothing: float = 0.0


@dataclass
class TrainerConfig:
    """The Lightning Trainer's settings, plus checkpointing and early stopping."""

    max_epochs: int = 30
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: str = "1"  # a count ("2"), a list ("[0,1]") or "auto"; a string so all forms fit
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    precision: str = "32-true"
    deterministic: bool = True
    # torch's CPU threads for this process; 0 keeps torch's default (one per core).
    num_threads: int = 0
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    profiler: str | None = None  # a key of PROFILERS
    fast_dev_run: int = 0
    overfit_batches: float = 0.0
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    limit_test_batches: float = 1.0
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    early_stopping_patience: int = 8  # 0 turns early stopping off
    save_top_k: int = 1


@dataclass
class LoggerConfig:
    """Experiment tracking: MLflow by default, W&B as an alternative, or none."""

    name: str = "mlflow"  # mlflow | wandb | none
    # None means the embedded store: sqlite:///<workspace>/mlflow.db with artifacts beside it.
    # $OPSLOOP_TRACKING_URI overrides this.
    tracking_uri: str | None = None
    experiment: str = "opsloop"
    run_name: str | None = None
    log_model: bool = True
    wandb_project: str = "opsloop"
    wandb_mode: str = "offline"  # offline needs no account
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ParamSpec:
    """One dimension of a sweep's search space."""

    type: str = "float"  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class SweepConfig:
    """An Optuna study over `params` (keys are config paths such as `optim.lr`)."""

    study_name: str = "opsloop"
    n_trials: int = 20
    timeout_seconds: float | None = None
    metric: str = "val/loss"
    direction: str = "minimize"
    # None means the embedded store: sqlite:///<workspace>/optuna.db. Any RDB URL lets workers
    # on many machines join one study.
    storage: str | None = None
    sampler_seed: int | None = None
    pruner_warmup_epochs: int = 2
    params: dict[str, ParamSpec] = field(default_factory=dict)


@dataclass
class RegistryConfig:
    """The model registry and its promotion gate."""

    model_name: str = "digits-cnn"
    # The challenger may trail the champion by at most this much accuracy on the holdout split.
    accuracy_margin: float = 0.005
    # ...and must answer one image within this many milliseconds (median, ONNX Runtime, 1 thread).
    latency_budget_ms: float = 20.0
    latency_samples: int = 200
    holdout_split: str = "test"
    quantize: bool = False  # export a dynamic-int8 model as the served file
    bundle_dir: str = "bundles"  # where `opsloop pipeline` materialises the champion's bundle
    # Live evidence (0 = off): the challenger must also have answered at least this many labelled
    # requests in shadow or canary, with accuracy not worse than the champion's on the same
    # period by more than live_margin.
    live_min_labels: int = 0
    live_margin: float = 0.02


@dataclass
class OpsloopConfig:
    """The root of every composed experiment config."""

    seed: int = 42
    # Where runs, the embedded MLflow store and sweep studies live (relative to the cwd).
    workspace: str = "."
    output_dir: str = "outputs"
    ckpt_path: str | None = None  # resume training from this checkpoint
    # A fixed run directory instead of <output_dir>/<timestamp>-<id> (e.g. for DVC's outs).
    run_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent; called before composing)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="opsloop_schema", node=OpsloopConfig)


def find_config_dir(explicit: str | Path | None = None) -> Path:
    """Find `configs/`: the argument, $OPSLOOP_CONFIG_DIR, ./configs, then the source tree."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(CONFIG_DIR_ENV):
        candidates.append(Path(os.environ[CONFIG_DIR_ENV]))
    else:
        candidates += [Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"]
        candidates.append(Path(__file__).resolve().parent / "configs")  # inside a built wheel
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"no configs/config.yaml found (looked in {tried}); run from the project root "
        f"or set {CONFIG_DIR_ENV}"
    )


def list_group_options(config_dir: Path, group: str) -> list[str]:
    """The option names of one config group, e.g. ['digits', 'mnist', ...] for `data`."""
    group_dir = config_dir / group
    if not group_dir.is_dir():
        return []
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


_GROUP_OVERRIDE = re.compile(r"^[+~]?(?P<group>[A-Za-z_][\w/]*)=(?P<value>[^=]*)$")


def check_group_choices(config_dir: Path, overrides: Sequence[str]) -> None:
    """Fail early, naming the valid choices, when an override picks a missing group option."""
    for override in overrides:
        match = _GROUP_OVERRIDE.match(override)
        if not match:
            continue
        group, value = match["group"], match["value"]
        options = list_group_options(config_dir, group)
        if options and value not in options and value != "null":
            raise ConfigError(
                f"unknown {group} '{value}' in override '{override}'; "
                f"choose one of: {', '.join(options)}"
            )


def load_config(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "config",
    config_dir: str | Path | None = None,
) -> OpsloopConfig:
    """Compose `configs/<config_name>.yaml` and overrides into a validated `OpsloopConfig`."""
    from omegaconf import OmegaConf

    cfg = compose_config(overrides, config_name=config_name, config_dir=config_dir)
    try:
        typed = OmegaConf.to_object(cfg)
    except Exception as exc:  # omegaconf raises MissingMandatoryValue and ValidationError here
        raise ConfigError(_one_line_config_error(exc)) from exc
    if not isinstance(typed, OpsloopConfig):
        raise ConfigError(f"configs/{config_name}.yaml does not use the opsloop_schema defaults")
    validate_config(typed)
    return typed


def compose_config(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "config",
    config_dir: str | Path | None = None,
) -> Any:
    """Compose the raw (DictConfig) config; errors become one-line `ConfigError`s."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    directory = find_config_dir(config_dir)
    check_group_choices(directory, overrides)
    register_configs()
    try:
        with initialize_config_dir(
            config_dir=str(directory), version_base="1.3", job_name="opsloop"
        ):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_one_line_config_error(exc)) from exc


def _one_line_config_error(exc: BaseException) -> str:
    """Condense Hydra/OmegaConf's multi-line, chained messages into one line naming the key."""
    parts: list[str] = []
    full_key = ""
    cause: BaseException | None = exc
    while cause is not None:  # the outer error names the override, the inner one the problem
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        if lines and lines[0] not in parts:
            parts.append(lines[0])
        full_key = next((ln for ln in lines if ln.startswith("full_key:")), full_key)
        cause = cause.__cause__
    detail = ": ".join(parts) or type(exc).__name__
    if full_key:
        detail += f" ({full_key})"
    return f"bad configuration: {detail}; check the key and value (see configs/ for valid keys)"


def validate_config(cfg: OpsloopConfig) -> None:
    """Every check a type alone cannot express, so `opsloop config` rejects what a stage would.

    Nothing here touches the disk or the network: a config that passes can still name a dataset
    that is not prepared yet, which the stage that reads it reports.
    """
    validate_data(cfg.data)
    validate_model(cfg.model, cfg.optim)
    validate_trainer(cfg.trainer)
    _check_choice("logger.name", cfg.logger.name, LOGGERS)
    validate_registry(cfg.registry)
    validate_sweep_config(cfg)


def validate_data(data: DataConfig) -> None:
    """Fractions, channels, batch size and a known source."""
    from opsloop.data.sources import SOURCES  # numpy only: no heavy import at config load

    for key, value in (("val_fraction", data.val_fraction), ("test_fraction", data.test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"data.{key}={value} is out of range; use a fraction in (0, 1)")
    if data.val_fraction + data.test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {data.val_fraction + data.test_fraction}"
            " leaves no training data; keep their sum below 1"
        )
    if data.channels not in (1, 3):
        raise ConfigError(f"data.channels={data.channels} is not supported; use 1 or 3")
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size={data.batch_size} must be at least 1")
    if not 0.0 < data.holdout_fraction < 1.0:
        raise ConfigError(
            f"data.holdout_fraction={data.holdout_fraction} is out of range; use one in (0, 1)"
        )
    if data.min_labels < 1:
        raise ConfigError(f"data.min_labels={data.min_labels} must be at least 1")
    if data.num_workers < 0:
        raise ConfigError(
            f"data.num_workers={data.num_workers} must be 0 (load in-process) or more"
        )
    _check_choice("data.source", data.source, tuple(SOURCES))


def validate_model(model: ModelConfig, optim: OptimConfig) -> None:
    """A known architecture with sane sizes, and a known optimizer and schedule."""
    _check_choice("model.name", model.name, tuple(MODELS))
    for key, value in (
        ("model.channels", model.channels),
        ("model.depth", model.depth),
        ("model.hidden", model.hidden),
    ):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout} is out of range; use [0, 1)")
    _check_choice("optim.optimizer", optim.optimizer, OPTIMIZERS)
    _check_choice("optim.scheduler", optim.scheduler, SCHEDULERS)
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr={optim.lr} must be positive")


def validate_trainer(trainer: TrainerConfig) -> None:
    """Devices, threads, checkpoints, profiler and the monitored metric's mode."""
    parse_devices(trainer.devices)
    if trainer.num_threads < 0:
        raise ConfigError(
            f"trainer.num_threads={trainer.num_threads} must be 0 (torch's default) or more"
        )
    if trainer.save_top_k == 0 or trainer.save_top_k < -1:
        raise ConfigError(
            f"trainer.save_top_k={trainer.save_top_k} would keep no best checkpoint; use 1 or "
            "more, or -1 for all"
        )
    for key, value in (("max_epochs", trainer.max_epochs), ("num_nodes", trainer.num_nodes)):
        if value < 1:
            raise ConfigError(f"trainer.{key}={value} must be at least 1")
    _check_choice("trainer.monitor_mode", trainer.monitor_mode, ("min", "max"))
    if trainer.profiler is not None:
        _check_choice("trainer.profiler", trainer.profiler, tuple(PROFILERS))


def validate_registry(registry: RegistryConfig) -> None:
    """Margins are accuracies, counts are counts."""
    for key in ("accuracy_margin", "live_margin"):
        value = getattr(registry, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"registry.{key}={value} is out of range; use an accuracy in [0, 1)")
    if registry.live_min_labels < 0:
        raise ConfigError(
            f"registry.live_min_labels={registry.live_min_labels} must be 0 (off) or more"
        )
    if registry.latency_budget_ms <= 0 or registry.latency_samples < 1:
        raise ConfigError(
            "registry.latency_budget_ms must be positive and registry.latency_samples at least 1"
        )


def parse_devices(value: str) -> int | list[int] | str:
    """`trainer.devices` as Lightning wants it: "2" -> 2, "[0,1]" -> [0, 1], "auto" -> "auto"."""
    text = value.strip()
    if text == "auto":
        return "auto"
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, int) and not isinstance(parsed, bool):
        return parsed
    if isinstance(parsed, list) and parsed and all(type(item) is int for item in parsed):
        return list(parsed)
    raise ConfigError(
        f"trainer.devices='{value}' is not a device count, a list such as [0,1], or auto"
    )


def validate_sweep_config(cfg: OpsloopConfig) -> None:
    """The sweep's settings and every search-space entry (checked before any trial runs)."""
    sweep = cfg.sweep
    if not STUDY_NAME.match(sweep.study_name):
        raise ConfigError(
            f"sweep.study_name='{sweep.study_name}' is not usable as a file name; "
            "use letters, digits, '_' and '-' only"
        )
    _check_choice("sweep.direction", sweep.direction, ("minimize", "maximize"))
    if sweep.n_trials < 1:
        raise ConfigError(f"sweep.n_trials={sweep.n_trials} must be at least 1")
    if sweep.timeout_seconds is not None and sweep.timeout_seconds <= 0:
        raise ConfigError(f"sweep.timeout_seconds={sweep.timeout_seconds} must be positive")
    if sweep.pruner_warmup_epochs < 0:
        raise ConfigError(f"sweep.pruner_warmup_epochs={sweep.pruner_warmup_epochs} must be >= 0")
    for key, spec in sweep.params.items():
        check_param_path(cfg, key)
        check_param_spec(key, spec)


def check_param_path(cfg: OpsloopConfig, key: str) -> None:
    """Fail unless `key` (e.g. `optim.lr`) names one value of the typed config."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth]) or "the config root"
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise ConfigError(
                f"sweep.params.{key}: '{part}' is not a key of {section}; "
                f"use one of: {', '.join(names)}"
            )
        node = getattr(node, part)
        if depth + 1 < len(parts) and not dataclasses.is_dataclass(node):
            raise ConfigError(
                f"sweep.params.{key}: {'.'.join(parts[: depth + 1])} is a value, not a section"
            )
    if dataclasses.is_dataclass(node):
        raise ConfigError(
            f"sweep.params.{key}: {key} is a section, not a value; name a key inside it "
            f"such as {key}.{dataclasses.fields(node)[0].name}"
        )
    if parts[0] == "sweep":
        raise ConfigError(f"sweep.params.{key}: the sweep's own settings cannot be swept")


def check_param_spec(key: str, spec: ParamSpec) -> None:
    """Fail with a one-line `ConfigError` naming `key` unless Optuna can sample `spec`."""
    where = f"sweep.params.{key}"
    _check_choice(f"{where}.type", spec.type, PARAM_TYPES)
    if spec.type == "categorical":
        _check_categorical(where, spec)
        return
    if spec.choices is not None:
        raise ConfigError(f"{where}: `choices` belongs to type categorical, not {spec.type}")
    if spec.low is None or spec.high is None:
        raise ConfigError(f"{where}: a {spec.type} range needs both `low` and `high`")
    if spec.low >= spec.high:
        raise ConfigError(f"{where}: low={spec.low} must be below high={spec.high}")
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, not {spec.low}")
    if spec.log and spec.step is not None:
        raise ConfigError(f"{where}: `step` and `log: true` cannot be combined")
    if spec.step is not None and spec.step <= 0:
        raise ConfigError(f"{where}: step={spec.step} must be positive")
    if spec.type == "int":
        for name in ("low", "high", "step"):
            value = getattr(spec, name)
            if value is not None and not float(value).is_integer():
                raise ConfigError(f"{where}: an int range needs a whole {name}, not {value}")


def _check_categorical(where: str, spec: ParamSpec) -> None:
    if spec.low is not None or spec.high is not None or spec.step is not None or spec.log:
        raise ConfigError(f"{where}: a categorical takes only `choices`, not low/high/step/log")
    if not spec.choices:
        raise ConfigError(f"{where}: a categorical needs a non-empty `choices` list")
    for choice in spec.choices:
        if choice is not None and not isinstance(choice, str | int | float | bool):
            raise ConfigError(f"{where}: choice {choice!r} is not a number, string, bool or null")


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}='{value}' is unknown; use one of: {', '.join(choices)}")


def resolve_object(path: str) -> Any:
    """The object a registry entry names (`module:attribute`), imported now."""
    import importlib

    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def config_to_yaml(cfg: object) -> str:
    """The resolved config as YAML, as saved beside every run and bundle."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: object) -> str:
    """A short, stable hash of a resolved config, recorded in lineage."""
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]
