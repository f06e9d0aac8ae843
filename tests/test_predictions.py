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


def test_a_log_written_before_roles_and_labels_existed_is_upgraded(tmp_path: Path) -> None:
    """The old table (no `role` column, no `feedback` table) gains both, and its rows read back
    as champion answers without labels."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL, "
            "item INTEGER NOT NULL, created_at FLOAT NOT NULL, endpoint VARCHAR(16) NOT NULL, "
            "model_name VARCHAR(128) NOT NULL, model_version VARCHAR(64) NOT NULL, "
            "input BLOB NOT NULL, input_dtype VARCHAR(8) NOT NULL, "
            "input_shape VARCHAR(64) NOT NULL, probabilities BLOB NOT NULL, "
            "embedding BLOB NOT NULL, label INTEGER NOT NULL, confidence FLOAT NOT NULL, "
            "latency_ms FLOAT NOT NULL)"
        )
        connection.execute(
            "INSERT INTO predictions VALUES (1, 'r1', 0, 1.0, 'infer', 'digits', '3', ?, "
            "'uint8', '[1, 2, 2]', ?, ?, 1, 0.9, 2.0)",
            (bytes(4), bytes(8), bytes(8)),
        )
    url = f"sqlite:///{path}"
    assert read_predictions(url).roles == ["champion"]  # read as-is, before any upgrade
    engine = open_engine(url, create=True)
    ensure_schema(engine)
    inspector = inspect(engine)
    assert "role" in {column["name"] for column in inspector.get_columns("predictions")}
    assert inspector.has_table("feedback")
    engine.dispose()
    logged = read_predictions(url)
    assert logged.roles == ["champion"]
    assert list(logged.true_labels) == [-1]
