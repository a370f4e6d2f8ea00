"""``transports.connect_blocking``: a plain blocking socket, the error mapping of ``connect``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

import transports
from transports import EndpointNameError, EndpointUnavailableError

#: Timeout for connects that must succeed, seconds (only a hang would reach it).
HANG_GUARD_S = 10.0


def test_returns_a_blocking_socket_with_the_timeout_set(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with transports.connect_blocking(path, HANG_GUARD_S) as client:
            assert client.gettimeout() == HANG_GUARD_S
            assert not client.get_inheritable()
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"
        with transports.connect_blocking(path, None) as client:
            assert client.gettimeout() is None and client.getblocking()
            server.accept()[0].close()


def test_nobody_listening_is_endpoint_unavailable(sockdir: Path) -> None:
    with pytest.raises(EndpointUnavailableError, match="nothing listens"):
        transports.connect_blocking(str(sockdir / "missing.sock"), HANG_GUARD_S)
    dead = str(sockdir / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as closed:
        closed.bind(dead)  # bound, never listening: refused
    with pytest.raises(EndpointUnavailableError):
        transports.connect_blocking(dead, HANG_GUARD_S)


def test_a_path_too_long_for_sun_path_is_a_name_error(sockdir: Path) -> None:
    with pytest.raises(EndpointNameError, match="sun_path"):
        transports.connect_blocking(str(sockdir / ("x" * 200)), HANG_GUARD_S)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux refuses a full backlog with EAGAIN")
def test_a_full_backlog_waits_until_the_timeout_then_a_freed_slot_is_used(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(0)
        with transports.connect_blocking(path, HANG_GUARD_S):  # takes the only slot
            with pytest.raises(TimeoutError, match="backlog"):
                transports.connect_blocking(path, 0.2)
            server.accept()[0].close()  # frees the slot
            with transports.connect_blocking(path, HANG_GUARD_S) as third:
                assert third.getpeername() == path
