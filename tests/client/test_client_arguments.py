"""Client-side errors that need no broker: argument checks and refusal values.

``connect`` checks the service name and version with the broker's own grammar and
raises before it opens any connection; ``RefusedError`` turns a refusal's details
map into typed attributes.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import rpbroker
import transports
from rpbroker.errors import ConnectArgumentError, RefusedError
from rpbroker.policy.hello import SERVICE_NAME_GRAMMAR, VERSION_GRAMMAR
from rpbroker.wire.codes import RefusalCode


@pytest.fixture
def listening_socket() -> Iterator[tuple[str, socket.socket]]:
    """A real listening socket nobody accepts on: any connect would queue in its backlog."""
    directory = Path(tempfile.mkdtemp(prefix="rpb-arg-", dir=transports.short_temp_dir()))
    path = str(directory / "broker.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield path, sock
    finally:
        sock.close()
        Path(path).unlink()
        directory.rmdir()


def assert_nothing_connected(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.accept()


BAD_SERVICES = ["", "Echo", "echo service", "../echo", "a" * 65, "echo\n"]
BAD_VERSIONS = ["", "1.0", "v1.0.0", "1.0.0+build", "1.0.0-RC1", "1.0.0\n", "1.0.0-" + "a" * 60]


@pytest.mark.parametrize("service", BAD_SERVICES)
async def test_malformed_service_is_a_value_error_before_any_io(
    listening_socket: tuple[str, socket.socket], service: str
) -> None:
    path, sock = listening_socket
    with pytest.raises(ValueError, match=r"^service ") as caught:
        async with rpbroker.connect(service, "1.0.0", broker=path):
            raise AssertionError("connected")
    error = caught.value
    assert isinstance(error, ConnectArgumentError) and isinstance(error, rpbroker.BrokerError)
    assert (error.argument, error.value, error.grammar) == (
        "service",
        service,
        SERVICE_NAME_GRAMMAR,
    )
    assert SERVICE_NAME_GRAMMAR in str(error)
    assert_nothing_connected(sock)


@pytest.mark.parametrize("version", BAD_VERSIONS)
async def test_malformed_version_is_a_value_error_before_any_io(
    listening_socket: tuple[str, socket.socket], version: str
) -> None:
    path, sock = listening_socket
    with pytest.raises(ConnectArgumentError, match=r"^version ") as caught:
        await rpbroker.open_connection("echo", version, broker=path)
    assert (caught.value.argument, caught.value.grammar) == ("version", VERSION_GRAMMAR)
    assert_nothing_connected(sock)


def test_argument_error_quotes_a_hostile_value_safely() -> None:
    error = ConnectArgumentError("service", "\x1b[31m" + "x" * 10_000, SERVICE_NAME_GRAMMAR)
    message = str(error)
    assert "\x1b" not in message and "\\x1b[31m" in message
    assert len(message) < 200
    assert error.value.startswith("\x1b[31m")  # the attribute keeps what was passed


def test_refused_error_exposes_rpbroker_details_as_attributes() -> None:
    error = RefusedError(
        RefusalCode.VERSION_BLOCKED,
        "wanted_version is below min_version",
        30_000,
        {"wanted_version": "0.9.0", "min_version": "1.0.0", "version_allow_list": "1.0.0,1.1.0"},
    )
    assert error.wanted_version == "0.9.0"
    assert error.min_version == "1.0.0"
    assert error.version_allow_list == ("1.0.0", "1.1.0")
    assert error.service_name is None and error.rejected_field is None
    assert str(error) == (
        "VERSION_BLOCKED: wanted_version is below min_version (min_version='1.0.0', "
        "version_allow_list='1.0.0,1.1.0', wanted_version='0.9.0') (retry after 30000 ms)"
    )
    with pytest.raises(TypeError):
        error.details["min_version"] = "0.0.0"  # type: ignore[index]


def test_refused_error_without_details_reads_as_before() -> None:
    error = RefusedError(RefusalCode.SERVICE_UNKNOWN, "service definition was not found")
    assert str(error) == "SERVICE_UNKNOWN: service definition was not found"
    assert error.details == {}
    assert error.version_allow_list == ()
    assert error.service_name is None
