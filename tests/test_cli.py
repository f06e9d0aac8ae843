"""The CLI: help, version, the data command, and one-line errors with the right exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsloop import __version__
from opsloop.cli import main
from tests.support import CONFIG_DIR


@pytest.fixture(autouse=True)
def _configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSLOOP_CONFIG_DIR", str(CONFIG_DIR))


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "data" in out
    assert "--log-level" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"opsloop {__version__}"


def test_data_prints_path_counts_and_hash(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["data", f"data.processed_dir={workspace}", f"data.cache_dir={workspace / 'raw'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(workspace / "digits") in out.replace("\n", "")
    assert "train=1259" in out
    assert "written" in out
    assert main(args) == 0
    assert "nothing rewritten" in capsys.readouterr().out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--colour"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--colour" in line
    assert "opsloop data --help" in line


def test_unknown_dataset_lists_valid_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "data=cifar"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cifar" in line
    assert "digits, fashion_mnist, imagefolder, mnist" in line


def test_unknown_key_and_bad_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "data.colour=red"]) == 2
    assert "data.colour" in one_error_line(capsys.readouterr().err)
    assert main(["--log-level", "loud", "data"]) == 2
    assert "loud" in one_error_line(capsys.readouterr().err)


def test_runtime_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "data=imagefolder", f"data.root={tmp_path / 'missing'}"]
    assert main(args) == 1
    assert "is not a directory" in one_error_line(capsys.readouterr().err)


def test_traceback_only_with_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "data=imagefolder", f"data.root={tmp_path / 'missing'}"]
    assert main(["--log-level", "debug", *args]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_script_runs_in_a_fresh_process(workspace: Path) -> None:
    script = Path(sys.executable).with_name("opsloop")
    env = {**os.environ, "OPSLOOP_CONFIG_DIR": str(CONFIG_DIR)}
    done = subprocess.run(
        [str(script), "data", "data=nope"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown data 'nope'")


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from opsloop.cli import main; main(['--help']);"
        "heavy = {'torch', 'lightning', 'mlflow', 'sklearn', 'hydra'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("[]")
