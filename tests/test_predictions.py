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
    assert inspect(engine).has_table("prediction_requests")
    assert inspect(engine).has_table("prediction_items")
    engine.dispose()


def test_a_bad_url_is_named_without_its_password() -> None:
    with pytest.raises(PredictionLogError, match=r"'nope://u:\*\*\*@h/db' is invalid") as caught:
        read_predictions("nope://u:secret@h/db")
    assert "secret" not in str(caught.value)


def test_a_zero_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PredictionLogError, match="limit=0"):
        read_predictions(f"sqlite:///{tmp_path / 'log.db'}", limit=0)


def test_a_log_written_by_opsloop_0_1_is_migrated_once(tmp_path: Path) -> None:
    """The 0.1 table (one row per example, no `role` column) becomes requests and items; its
    float32 outputs read back unchanged, and the old table is gone."""
    import sqlite3

    import numpy as np

    path = tmp_path / "old.db"
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], "<f4")
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
        for row, (request_id, item) in enumerate([("r1", 0), ("r1", 1), ("r2", 0)]):
            connection.execute(
                "INSERT INTO predictions VALUES (?, ?, ?, ?, 'infer', 'digits', '3', ?, "
                "'uint8', '[1, 2, 2]', ?, ?, 1, 0.9, 2.0)",
                (
                    row + 1,
                    request_id,
                    item,
                    float(row),
                    bytes([row] * 4),
                    probabilities[row].tobytes(),
                    np.full(3, row, "<f4").tobytes(),
                ),
            )
    url = f"sqlite:///{path}"
    with pytest.raises(PredictionLogError, match=r"written by opsloop 0\.1; start `opsloop serve`"):
        read_predictions(url)
    engine = open_engine(url, create=True)
    ensure_schema(engine)
    ensure_schema(engine)  # once only
    inspector = inspect(engine)
    assert not inspector.has_table("predictions")
    engine.dispose()
    logged = read_predictions(url)
    assert logged.request_ids == ["r1", "r1", "r2"]
    assert logged.items.tolist() == [0, 1, 0]
    assert logged.roles == ["champion"] * 3
    np.testing.assert_array_equal(logged.probabilities, probabilities)  # float32 kept
    np.testing.assert_array_equal(logged.embeddings[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(logged.inputs[2], np.full((1, 2, 2), 2.0))
    assert list(logged.true_labels) == [-1, -1, -1]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM prediction_requests").fetchone() == (2,)
