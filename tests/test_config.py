"""Config composition: every file in configs/ loads, and bad keys or values fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsloop.config import (
    DataConfig,
    OpsloopConfig,
    config_hash,
    config_to_yaml,
    find_config_dir,
    list_group_options,
    load_config,
)
from opsloop.errors import ConfigError
from tests.support import CONFIG_DIR


def all_group_options() -> list[tuple[str, str]]:
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    return [(group, option) for group in groups for option in list_group_options(CONFIG_DIR, group)]


def test_the_config_dir_has_groups_to_test() -> None:
    assert ("data", "digits") in all_group_options()


@pytest.mark.parametrize(("group", "option"), all_group_options())
def test_every_config_file_loads(group: str, option: str) -> None:
    # imagefolder needs a root; any value will do for composition.
    extra = ["data.root=/some/dir"] if option == "imagefolder" else []
    cfg = load_config([f"{group}={option}", *extra], config_dir=CONFIG_DIR)
    assert isinstance(cfg, OpsloopConfig)
    if not hasattr(cfg, group):  # experiment/ and debug/ files patch the root: run below
        return
    from omegaconf import OmegaConf

    # Every plain value the file sets is what the typed config holds.
    written = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    assert isinstance(written, dict)
    section = getattr(cfg, group)
    for key, value in written.items():
        if key != "defaults" and value != "???" and not isinstance(value, dict | list):
            assert getattr(section, str(key)) == value, f"{group}/{option}.yaml: {key}"


def test_default_config_is_typed_digits() -> None:
    cfg = load_config([], config_dir=CONFIG_DIR)
    assert isinstance(cfg.data, DataConfig)
    assert cfg.data.name == "digits"
    assert cfg.data.class_names == [str(i) for i in range(10)]


def test_overrides_apply_with_types() -> None:
    cfg = load_config(["data=mnist", "data.val_fraction=0.2", "seed=7"], config_dir=CONFIG_DIR)
    assert cfg.data.name == "mnist"
    assert cfg.data.val_fraction == pytest.approx(0.2)
    assert cfg.seed == 7
    assert cfg.data.files["train_images"].filename == "train-images-idx3-ubyte.gz"


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.colour") as info:
        load_config(["data.colour=red"], config_dir=CONFIG_DIR)
    assert "\n" not in str(info.value)


def test_wrong_type_names_the_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"'abc'.*data\.seed") as info:
        load_config(["data.seed=abc"], config_dir=CONFIG_DIR)
    assert "\n" not in str(info.value)


def test_unknown_group_option_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown data 'cifar'.*digits, fashion_mnist"):
        load_config(["data=cifar"], config_dir=CONFIG_DIR)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_fraction=1.5", "out of range"),
        ("data.test_fraction=0.9", "leaves no training data"),
        ("data.channels=2", "use 1 or 3"),
        ("data.batch_size=0", "at least 1"),
        ("data.source=zip", "unknown"),
    ],
)
def test_out_of_range_values_are_rejected(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config([override], config_dir=CONFIG_DIR)


def test_malformed_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bad configuration"):
        load_config(["seed=[1"], config_dir=CONFIG_DIR)


def test_config_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))
    monkeypatch.chdir(tmp_path)
    assert find_config_dir() == CONFIG_DIR.resolve()


def test_missing_config_dir_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="OPSLOOP_CONFIG_DIR"):
        find_config_dir(tmp_path / "nowhere")


def test_config_hash_is_stable_and_sensitive() -> None:
    first = load_config([], config_dir=CONFIG_DIR)
    again = load_config([], config_dir=CONFIG_DIR)
    other = load_config(["seed=1"], config_dir=CONFIG_DIR)
    assert config_hash(first) == config_hash(again)
    assert config_hash(first) != config_hash(other)
    assert "seed: 42" in config_to_yaml(first)


# --- every experiment and debug config is run, not only composed -------------------------------


def fake_mnist_cache(cache_dir: Path) -> list[str]:
    """Small random MNIST-format IDX files in the download cache, with checksum overrides.

    The real files cannot be downloaded here; these have MNIST's names, shapes and scale, so
    `experiment=mnist` runs exactly its own code path (the cache hit skips the download).
    """
    import gzip
    import hashlib
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "train_images": ("train-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 28, 28))),
        "train_labels": ("train-labels-idx1-ubyte.gz", np.arange(300) % 10),
        "test_images": ("t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28))),
        "test_labels": ("t10k-labels-idx1-ubyte.gz", np.arange(60) % 10),
    }
    overrides = []
    (cache_dir / "mnist").mkdir(parents=True)
    for key, (filename, array) in arrays.items():
        header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
            f">{array.ndim}I", *array.shape
        )
        payload = gzip.compress(header + array.astype(np.uint8).tobytes())
        (cache_dir / "mnist" / filename).write_bytes(payload)
        overrides.append(f"data.files.{key}.sha256={hashlib.sha256(payload).hexdigest()}")
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    [f"experiment={name}" for name in list_group_options(CONFIG_DIR, "experiment")]
    + [f"debug={name}" for name in list_group_options(CONFIG_DIR, "debug")],
)
def test_every_experiment_and_debug_config_runs(override: str, tmp_path: Path) -> None:
    """Prepare the data and train with each file: a config that cannot run fails here."""
    from opsloop.data import prepare_dataset
    from opsloop.train import train_model

    common = [
        f"workspace={tmp_path}",
        f"data.processed_dir={tmp_path / 'processed'}",
        f"data.cache_dir={tmp_path / 'raw'}",
        "logger=none",
    ]
    extra: list[str] = []
    if override.startswith("experiment="):
        # One batch of each split: the experiment's data, model and trainer, briefly.
        extra.append("debug=fast_dev_run")
    if override == "experiment=mnist":
        extra += fake_mnist_cache(tmp_path / "raw")
    cfg = load_config([override, *extra, *common], config_dir=CONFIG_DIR)
    prepare_dataset(cfg.data)
    result = train_model(cfg)
    assert result.best_checkpoint.is_file()
    assert 0.0 <= result.metrics["test/acc"] <= 1.0
