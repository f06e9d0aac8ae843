"""The connection limits' wiring into uvicorn (their behaviour on a real socket is in
tests/integration/test_serve_limits.py)."""

from __future__ import annotations

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from opsloop.errors import ConfigError
from opsloop.serve import limits, server
from opsloop.serve.limits import ConnectionLimits, error_response, http_options
from opsloop.serve.settings import load_settings

LIMITS = ConnectionLimits(max_header_bytes=4096, header_timeout_s=2.5, body_timeout_s=7.0)


def test_serve_runs_uvicorn_with_the_guarded_httptools_protocol() -> None:
    options = server.uvicorn_options(
        load_settings(max_header_bytes=4096, header_timeout_s=2.5, body_timeout_s=7)
    )
    protocol = options["http"]
    assert issubclass(protocol, HttpToolsProtocol)
    assert protocol.settings == LIMITS


def test_without_httptools_h11_still_bounds_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(_limits: ConnectionLimits) -> type:
        raise ImportError("No module named 'httptools'")

    monkeypatch.setattr(limits, "guarded_protocol", missing)
    assert http_options(LIMITS) == {"http": "h11", "h11_max_incomplete_event_size": 4096}


def test_a_refusal_is_a_complete_json_response_that_closes() -> None:
    raw = error_response(431, "request headers over the 4096-byte limit")
    head, body = raw.split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"connection: close" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert body == b'{"error":"request headers over the 4096-byte limit"}'


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_header_bytes", 10), ("header_timeout_s", 0), ("body_timeout_s", -1)],
)
def test_limits_out_of_range_fail_start_up_naming_the_variable(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"OPSLOOP_{field.upper()}="):
        load_settings(**{field: value})
