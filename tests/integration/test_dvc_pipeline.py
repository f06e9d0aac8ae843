"""dvc.yaml in a temporary copy of the repo: `dvc repro` runs the stages, a second run nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = {
    "configs/trainer/default.yaml": "max_epochs: 2\naccelerator: cpu\ndevices: '1'\n"
    "early_stopping_patience: 0\nenable_progress_bar: false\n",
    "configs/model/cnn.yaml": "name: cnn\nchannels: 8\ndepth: 1\nhidden: 32\ndropout: 0.0\n",
}


def run(args: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "OPSLOOP_CONFIG_DIR": str(cwd / "configs"),
    }
    env.pop("OPSLOOP_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The tracked files of this repo in a fresh git repository, with a 2-epoch tiny model."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    target = tmp_path / "repo"
    for name in files:
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(("data/processed/", "tests/")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for name, text in FAST.items():
        (target / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target


def test_repro_twice_runs_nothing_the_second_time(repo: Path) -> None:
    first = run(["repro"], repo)
    for stage in ("params", "data", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in first
    assert (repo / "bundles" / "candidate" / "bundle.json").is_file()
    second = run(["repro"], repo)
    assert "Running stage" not in second
    metrics = run(["metrics", "show"], repo)
    assert "accuracy" in metrics

    # A model change reruns training and what follows it, but not the data stage.
    (repo / "configs" / "model" / "cnn.yaml").write_text(
        FAST["configs/model/cnn.yaml"].replace("channels: 8", "channels: 4")
    )
    third = run(["repro"], repo)
    assert "Running stage 'train'" in third
    assert "Running stage 'data'" not in third
