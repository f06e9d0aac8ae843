"""The prediction log's read side: where the default log is, and what an unusable one says."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from opsloop.errors import PredictionLogError
from opsloop.predictions import default_log_url, ensure_schema, open_engine, read_predictions


def test_the_default_log_is_the_servers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OPSLOOP_PREDLOG_URL", raising=False)
    monkeypatch.setenv("OPSLOOP_WORKSPACE", str(tmp_path))
    assert default_log_url() == f"sqlite:///{tmp_path.resolve() / 'predictions.db'}"
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "postgresql://u:p@h/db")
    assert default_log_url() == "postgresql://u:p@h/db"
    monkeypatch.setenv("OPSLOOP_PREDLOG_URL", "none")
    with pytest.raises(PredictionLogError, match="OPSLOOP_PREDLOG_URL=none"):
        default_log_url()


def test_creating_the_schema_twice_is_harmless(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'sub' / 'log.db'}", create=True)
    ensure_schema(engine)
    ensure_schema(engine)
    assert inspect(engine).has_table("predictions")
    engine.dispose()


def test_a_bad_url_is_named_without_its_password() -> None:
    with pytest.raises(PredictionLogError, match=r"'nope://u:\*\*\*@h/db' is invalid") as caught:
        read_predictions("nope://u:secret@h/db")
    assert "secret" not in str(caught.value)


def test_a_zero_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PredictionLogError, match="limit=0"):
        read_predictions(f"sqlite:///{tmp_path / 'log.db'}", limit=0)
