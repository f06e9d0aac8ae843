"""Workspace paths: where the pipeline, the server and the registry cache put things."""

from __future__ import annotations

from pathlib import Path

from opsloop.workspace import Workspace


def test_paths_are_fixed_relative_to_the_root(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    assert workspace.served_bundle("bundles", "digits-cnn") == tmp_path / "bundles" / "digits-cnn"
    assert workspace.bundle_cache == tmp_path / ".opsloop" / "bundles"
    assert workspace.predictions_url == f"sqlite:///{tmp_path.resolve() / 'predictions.db'}"
    assert workspace.params_file == tmp_path / "params.yaml"
    assert workspace.candidate_bundle == tmp_path / "bundles" / "candidate"
    assert not any(tmp_path.iterdir())  # asking creates nothing
