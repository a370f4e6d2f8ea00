"""systemd's side of the Unix transport: the passed listening socket and ``sd_notify``.

The environment parsing runs against a plain dict; descriptor checks run on real
sockets of every wrong kind (``_adopt_listener`` takes the descriptor number, so
the test process's own descriptor 3 is never touched); notifications go to a real
datagram socket, by path and by abstract name.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import transports
from transports import NotifyDelivery, SocketActivationError, TransportError
from transports._unix_systemd import UnixServiceNotifier, _adopt_listener

HANG_GUARD_S = 10


# -- LISTEN_PID / LISTEN_FDS ----------------------------------------------------------


def test_no_variables_means_no_inherited_socket() -> None:
    assert transports.inherited_listener({}) is None


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "A": "b"}
    assert transports.inherited_listener(env) is None
    assert env == {"A": "b"}


def test_zero_sockets_means_none() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert transports.inherited_listener(env) is None
    assert env == {}


@pytest.mark.parametrize(
    ("pid", "fds", "match"),
    [("me", "1", "LISTEN_PID='me'"), ("{pid}", "-1", "LISTEN_FDS='-1'")],
)
def test_malformed_variables_are_named(pid: str, fds: str, match: str) -> None:
    env = {"LISTEN_PID": pid.format(pid=os.getpid()), "LISTEN_FDS": fds}
    with pytest.raises(SocketActivationError, match=match):
        transports.inherited_listener(env)
    assert env == {}


def test_more_than_one_socket_is_refused_before_touching_any() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
    with pytest.raises(SocketActivationError, match=r"passed 2 sockets.*exactly one"):
        transports.inherited_listener(env)


# -- the passed descriptor ------------------------------------------------------------


async def test_a_listening_unix_socket_is_adopted_and_its_file_left_alone(sockdir: Path) -> None:
    path = str(sockdir / "activated.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.set_inheritable(True)  # as systemd passes it
    inode = os.stat(path).st_ino
    listener = _adopt_listener(server.detach())
    try:
        assert listener.path == path
        with trio.fail_after(HANG_GUARD_S):
            client = await transports.connect(path)
            accepted = await listener.accept()
            await client.send_all(b"hi")
            assert await accepted.receive_some(2) == b"hi"
            await client.aclose()
            await accepted.aclose()
    finally:
        await listener.aclose()
    assert os.stat(path).st_ino == inode, "the socket file is still there, unchanged"


def test_the_adopted_descriptor_is_not_inherited_by_children(sockdir: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sockdir / "a.sock"))
    server.listen(1)
    server.set_inheritable(True)
    fd = server.detach()
    listener = _adopt_listener(fd)
    try:
        assert not os.get_inheritable(fd)
    finally:
        trio.run(listener.aclose)


@pytest.fixture
def wrong_descriptors(sockdir: Path) -> Iterator[dict[str, int]]:
    """One descriptor of each kind a socket unit could wrongly pass, closed afterwards."""
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    datagram.bind(str(sockdir / "dgram.sock"))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0rpbt-{secrets.token_hex(8)}")
    abstract.listen(1)
    read_end, write_end = os.pipe()
    closed = os.dup(read_end)
    os.close(closed)
    fds = {
        "datagram": datagram.detach(),
        "connected": left.detach(),
        "abstract": abstract.detach(),
        "pipe": read_end,
        "closed": closed,
    }
    try:
        yield fds
    finally:
        for name, fd in fds.items():
            if name != "closed":
                os.close(fd)
        right.close()
        os.close(write_end)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("datagram", "AF_UNIX SOCK_DGRAM socket; rpbroker serves an AF_UNIX stream socket"),
        ("connected", "is not listening"),
        ("abstract", "has no file-system path"),
        ("pipe", "is not a socket"),
        ("closed", "is not open"),
    ],
)
def test_a_wrong_descriptor_is_refused_and_left_open(
    wrong_descriptors: dict[str, int], kind: str, match: str
) -> None:
    fd = wrong_descriptors[kind]
    with pytest.raises(SocketActivationError, match=match) as caught:
        _adopt_listener(fd)
    assert f"descriptor {fd} passed by systemd" in str(caught.value)
    assert "ListenStream=" in str(caught.value), "the message says how to fix the unit"
    if kind != "closed":
        os.fstat(fd)  # still open: refusing does not close what was passed


# -- NOTIFY_SOCKET --------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, sockdir: Path
) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's, and its ``NOTIFY_SOCKET`` spelling."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(sockdir / "notify.sock")
        receiver.bind(address)
        spelled = address
    else:
        name = f"rpbt-notify-{secrets.token_hex(8)}"
        receiver.bind(f"\0{name}")
        spelled = f"@{name}"
    receiver.settimeout(HANG_GUARD_S)
    try:
        yield spelled, receiver
    finally:
        receiver.close()


def test_notifications_reach_the_service_manager(notify_socket: tuple[str, socket.socket]) -> None:
    spelled, receiver = notify_socket
    env = {"NOTIFY_SOCKET": spelled, "A": "b"}
    notifier = UnixServiceNotifier.from_environment(env)
    assert env == {"A": "b"}, "NOTIFY_SOCKET is removed so children do not inherit it"
    assert notifier.ready("serving on /run/x.sock") is NotifyDelivery.SENT
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving on /run/x.sock"
    assert notifier.status("two\nlines\r\nhere") is NotifyDelivery.SENT
    assert receiver.recv(4096) == b"STATUS=two lines here"
    assert notifier.stopping("draining") is NotifyDelivery.SENT
    assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = transports.service_notifier({})
    assert notifier.ready("x") is NotifyDelivery.NO_SERVICE_MANAGER
    assert transports.service_notifier({"NOTIFY_SOCKET": ""}).stopping("x") is (
        NotifyDelivery.NO_SERVICE_MANAGER
    )


def test_an_unsupported_notify_address_is_named() -> None:
    with pytest.raises(SocketActivationError, match="NOTIFY_SOCKET='vsock:2:1234'"):
        transports.service_notifier({"NOTIFY_SOCKET": "vsock:2:1234"})


def test_a_gone_service_manager_is_a_transport_error(sockdir: Path) -> None:
    notifier = transports.service_notifier({"NOTIFY_SOCKET": str(sockdir / "gone.sock")})
    with pytest.raises(TransportError, match=r"cannot notify the service manager at .*gone\.sock"):
        notifier.ready("x")
