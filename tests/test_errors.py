"""Helpers every error message uses: the first line of an exception, a URL without its secret."""

from __future__ import annotations

import pytest

from opsloop.errors import MissingExtraError, first_line, redact_text, redact_url


@pytest.mark.parametrize(
    ("message", "expected"),
    [("", "ValueError"), ("\n  \n", "ValueError"), ("one\ntwo", "one"), ("\n  first \nx", "first")],
)
def test_first_line_never_fails_on_empty_messages(message: str, expected: str) -> None:
    assert first_line(ValueError(message)) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://opsloop:s3cret@db:5432/log", "postgresql://opsloop:***@db:5432/log"),
        ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
        ("http://user:token@mlflow:5000", "http://user:***@mlflow:5000"),
        ("sqlite:////tmp/predictions.db", "sqlite:////tmp/predictions.db"),
        ("https://mlflow.example.com", "https://mlflow.example.com"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_a_missing_extra_says_what_to_install() -> None:
    error = MissingExtraError("the HTML drift report", "monitor", "evidently")
    assert str(error) == (
        "the HTML drift report needs the 'monitor' extra (evidently is not installed); "
        "install it with `pip install 'opsloop[monitor]'`"
    )


def test_redact_text_hides_every_password_in_a_message() -> None:
    message = (
        "cannot connect to postgresql+psycopg://opsloop:s3cret@db:5432/log (and "
        "http://u:t0ken@mlflow:5000/api); sqlite:////tmp/x.db is fine, so is https://a.b/c"
    )
    shown = redact_text(message)
    assert "s3cret" not in shown
    assert "t0ken" not in shown
    assert "postgresql+psycopg://opsloop:***@db:5432/log" in shown
    assert "http://u:***@mlflow:5000/api" in shown
    assert "sqlite:////tmp/x.db is fine, so is https://a.b/c" in shown


def test_first_line_hides_url_passwords() -> None:
    error = ValueError("connection to postgresql://u:hunter2@h/db refused\nmore")
    assert first_line(error) == "connection to postgresql://u:***@h/db refused"
