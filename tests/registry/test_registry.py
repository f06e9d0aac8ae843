"""The registry against a real MLflow store: versions, aliases, the gate, bundles by alias."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from opsloop.config import OpsloopConfig
from opsloop.data import prepare_dataset
from opsloop.errors import BundleError, ConfigError, ModelNotFoundError
from opsloop.export import export_bundle
from opsloop.registry import (
    CHALLENGER,
    CHAMPION,
    PromotionDecision,
    VersionInfo,
    attach_bundle,
    describe_model,
    download_bundle,
    get_version,
    list_versions,
    parse_model_ref,
    promote_model,
    register_model,
    resolve_bundle,
)
from opsloop.tracking import resolve_tracking_uri
from opsloop.train import TrainResult, train_model
from tests.support import make_config

pytestmark = pytest.mark.slow
NAME = "digits-test"


@dataclasses.dataclass
class World:
    cfg: OpsloopConfig
    uri: str
    good: TrainResult
    bad: TrainResult
    cache: Path


def publish(world: World, run: TrainResult, name: str = NAME) -> VersionInfo:
    """Register a run and attach its exported bundle, as the pipeline does."""
    info = register_model(run.run_id or "", name, world.uri)
    out = world.cfg.workspace + f"/bundles/{name}/v{info.version}"
    export_bundle(
        run.best_checkpoint, world.cfg.data, Path(out), model_name=name, model_version=info.version
    )
    attach_bundle(info, Path(out), world.uri)
    return info


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    workspace = tmp_path_factory.mktemp("registry")
    base = ("experiment=tiny", f"workspace={workspace}", "logger.run_name=good")
    cfg = make_config(workspace, *base, "trainer.max_epochs=8")
    prepare_dataset(cfg.data)
    good = train_model(cfg)
    # Honestly worse: one optimisation step from the random initialisation.
    bad_cfg = make_config(
        workspace,
        *base,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "logger.run_name=bad",
    )
    bad = train_model(bad_cfg)
    assert good.metrics["test/acc"] > bad.metrics["test/acc"] + 0.1
    uri = resolve_tracking_uri(cfg.logger, workspace)
    return World(cfg, uri, good, bad, workspace / "cache")


def promote(
    world: World, *, version: str | None = None, force: bool = False, name: str = NAME
) -> PromotionDecision:
    return promote_model(
        name,
        world.cfg.registry,
        world.cfg.data,
        world.uri,
        cache_dir=world.cache,
        version=version,
        force=force,
    )


def test_the_gate_end_to_end(world: World) -> None:
    first = publish(world, world.bad)
    assert first.aliases == [CHALLENGER]
    assert first.tags["dataset_hash"]

    # No champion yet: the first model is promoted directly.
    decision = promote(world)
    assert decision.promoted
    assert "first champion" in decision.reason
    assert get_version(f"{NAME}@{CHAMPION}", world.uri).version == first.version

    # A better challenger passes the gate.
    better = publish(world, world.good)
    decision = promote(world)
    assert decision.promoted
    assert decision.challenger_accuracy > decision.champion_accuracy
    assert get_version(f"{NAME}@{CHAMPION}", world.uri).version == better.version

    # A worse one is refused, with the reason recorded on the version; the champion stays.
    worse = publish(world, world.bad)
    decision = promote(world)
    assert not decision.promoted
    assert "trails champion" in decision.reason
    tags = get_version(f"{NAME}/{worse.version}", world.uri).tags
    assert tags["promotion.decision"] == "refused"
    assert "trails champion" in tags["promotion.reason"]
    assert float(tags["promotion.challenger_accuracy"]) < float(tags["promotion.champion_accuracy"])
    assert get_version(f"{NAME}@{CHAMPION}", world.uri).version == better.version

    # Asking to promote the champion itself decides nothing and records nothing.
    decision = promote(world, version=better.version)
    assert not decision.promoted
    assert "already the champion" in decision.reason

    # A latency budget nobody meets refuses a challenger as accurate as the champion (the same
    # run, registered again): only the latency check stands between it and promotion.
    equal = publish(world, world.good)
    strict = dataclasses.replace(world.cfg.registry, latency_budget_ms=1e-6)
    decision = promote_model(
        NAME, strict, world.cfg.data, world.uri, cache_dir=world.cache, version=equal.version
    )
    assert not decision.promoted
    assert decision.challenger_accuracy == decision.champion_accuracy
    assert "median latency" in decision.reason
    assert "exceeds the budget of 0.00 ms" in decision.reason
    assert get_version(f"{NAME}@{CHAMPION}", world.uri).version == better.version

    # --force overrides the gate and says so.
    decision = promote(world, version=worse.version, force=True)
    assert decision.promoted
    assert decision.forced
    assert "would have refused" in decision.reason
    description = describe_model(f"{NAME}@{CHAMPION}", world.uri)
    assert description.version.version == worse.version
    assert description.lineage["dataset_hash"] == tags["dataset_hash"]
    assert [event["forced"] for event in description.history] == [False, True]
    listed = {info.version: info.aliases for info in list_versions(NAME, world.uri)}
    assert listed[worse.version] == [CHAMPION]  # a version search alone reports no aliases
    assert "test/acc" in description.metrics


def test_bundle_by_alias(world: World, tmp_path: Path) -> None:
    name = f"{NAME}-by-alias"
    publish(world, world.good, name)
    assert promote(world, name=name).promoted
    champion = get_version(f"{name}@{CHAMPION}", world.uri)
    bundle, info = download_bundle(f"{name}@{CHAMPION}", world.uri, tmp_path / "served")
    assert info.version == champion.version
    assert bundle.manifest.model_version == champion.version
    path, version = resolve_bundle(name, CHAMPION, world.uri, tmp_path / "cache")
    assert version == champion.version
    assert (path / "bundle.json").is_file()


def test_missing_things_are_clear_and_change_nothing(world: World) -> None:
    name = f"{NAME}-missing"
    register_model(world.good.run_id or "", name, world.uri)
    before = {v.version: v.aliases for v in list_versions(name, world.uri)}
    with pytest.raises(ModelNotFoundError, match=r"has no version 99 \(versions: 1\)"):
        promote(world, version="99", name=name)
    with pytest.raises(ModelNotFoundError, match="no registered model 'ghost'"):
        get_version("ghost@champion", world.uri)
    with pytest.raises(ModelNotFoundError, match="has no alias 'staging'"):
        get_version(f"{name}@staging", world.uri)
    assert {v.version: v.aliases for v in list_versions(name, world.uri)} == before


def test_version_without_bundle_says_how_to_make_one(world: World, tmp_path: Path) -> None:
    info = register_model(world.good.run_id or "", NAME, world.uri, alias=None)
    with pytest.raises(BundleError, match="has no bundle; export one"):
        download_bundle(f"{NAME}/{info.version}", world.uri, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("m", ("m", None, None)), ("m@champion", ("m", "champion", None)), ("m/3", ("m", None, "3"))],
)
def test_parse_model_ref(text: str, expected: tuple[str, str | None, str | None]) -> None:
    ref = parse_model_ref(text)
    assert (ref.name, ref.alias, ref.version) == expected


@pytest.mark.parametrize("text", ["m/x", "@champion", "m@"])
def test_bad_model_refs(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_model_ref(text)
