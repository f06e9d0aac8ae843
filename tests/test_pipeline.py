"""`opsloop pipeline` end to end on the tiny config: a champion and a verified bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsloop.bundle import load_bundle
from opsloop.cli import main
from opsloop.pipeline import run_pipeline
from opsloop.registry import get_version
from opsloop.tracking import resolve_tracking_uri
from tests.support import CONFIG_DIR, make_config

pytestmark = pytest.mark.slow


def test_pipeline_promotes_and_materialises_a_bundle(workspace: Path) -> None:
    cfg = make_config(workspace, "experiment=tiny", f"workspace={workspace}")
    result = run_pipeline(cfg)
    names = [stage.name for stage in result.stages]
    assert names == [
        "data",
        "train",
        "evaluate",
        "register",
        "export",
        "promote",
        "materialise",
        "dvc commit",
    ]
    assert all(stage.detail for stage in result.stages)  # every stage says what it produced
    assert next(s for s in result.stages if s.name == "train").seconds > 0.5  # it really trained
    assert result.promoted  # the first model becomes the champion
    assert result.champion_version == result.model_version == "1"
    bundle = load_bundle(result.bundle_path)  # verified checksums
    assert bundle.manifest.model_version == "1"
    assert bundle.manifest.lineage.run_id == result.run_id
    assert "eval/accuracy" in bundle.manifest.metrics
    assert (workspace / "reports" / "evaluation" / "metrics.json").is_file()
    assert (workspace / "models" / "latest" / "checkpoints" / "best.ckpt").is_file()
    uri = resolve_tracking_uri(cfg.logger, workspace)
    assert get_version(f"{cfg.registry.model_name}@champion", uri).version == "1"
    assert result.stages[-1].detail.startswith("skipped")


def test_pipeline_cli_prints_the_summary(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))
    args = [
        "pipeline",
        "experiment=tiny",
        f"workspace={workspace}",
        f"data.processed_dir={workspace / 'processed'}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for text in ("opsloop pipeline", "accuracy", "model version", "champion", "bundle", "total"):
        assert text in out
    # A second run registers v2 and gates it against v1.
    assert main(args) == 0
    assert "v2" in capsys.readouterr().out


def test_pipeline_needs_mlflow(workspace: Path) -> None:
    from opsloop.errors import ConfigError

    cfg = make_config(workspace, "experiment=tiny", f"workspace={workspace}", "logger=none")
    with pytest.raises(ConfigError, match="logger=mlflow"):
        run_pipeline(cfg)
