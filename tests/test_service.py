"""What every service shares: one-line settings errors and a port check that never shares a port."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from opsloop.errors import ConfigError
from opsloop.service import COMMON_HINTS, ServiceSettings, check_port, make_socket, settings_error


def test_a_settings_error_names_the_variable_value_and_fix() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(port=0)
    error = settings_error(caught.value, "OPSLOOP_X_", COMMON_HINTS)
    assert str(error) == (
        "OPSLOOP_X_PORT=0 is invalid: Input should be greater than or equal to 1; "
        "use a TCP port between 1 and 65535"
    )


def test_a_port_held_by_a_sharing_server_is_refused() -> None:
    """A running server's workers share their port (SO_REUSEPORT); a second server must not."""
    holder = make_socket("127.0.0.1", 0)
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        assert holder.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: .*OPSLOOP_P"):
            check_port("127.0.0.1", port, "OPSLOOP_P")
    finally:
        holder.close()
    check_port("127.0.0.1", port, "OPSLOOP_P")  # free again
