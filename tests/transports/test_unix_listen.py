"""Unix transport: listening, squatting refusal, stale cleanup, connecting, fd exhaustion."""

from __future__ import annotations

import os
import resource
import socket
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import transports
from transports import (
    EndpointInUseError,
    EndpointNameError,
    EndpointUnavailableError,
    FdExhaustedError,
    InsecurePathError,
    TransportError,
)

#: Generous bound for anything that could hang (seconds); never a timing assertion.
HANG_GUARD_S = 10


def lexists(path: str | Path) -> bool:
    """Whether anything (even a dangling link) is at ``path``."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _stale_socket(path: Path) -> None:
    """Leave a socket file at ``path`` that nobody listens on (as after a crash)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


@contextmanager
def _raw_listener(path: str | bytes, backlog: int) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()


async def test_listener_roundtrip_modes_and_cleanup(sockdir: Path) -> None:
    runtime = sockdir / "run"  # missing: open_listener creates it 0700
    path = transports.broker_endpoint(directory=runtime)
    with trio.fail_after(HANG_GUARD_S):
        listener = await transports.open_listener(path)
        assert listener.path == path
        assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        client = await transports.connect(path)
        server = await listener.accept()
        assert isinstance(server, trio.SocketStream)
        assert not os.get_inheritable(server.socket.fileno())
        await client.send_all(b"ping")
        assert await server.receive_some(10) == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some(10) == b"pong"
        for stream in (client, server):
            await stream.aclose()
        await listener.aclose()
        assert not lexists(path)
        await listener.aclose()  # idempotent


async def test_socket_file_is_0600_even_with_a_permissive_umask(sockdir: Path) -> None:
    old = os.umask(0)
    try:
        listener = await transports.open_listener(str(sockdir / "a.sock"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(listener.path).st_mode) == 0o600
    await listener.aclose()


async def test_listener_refuses_an_insecure_directory(sockdir: Path) -> None:
    os.chmod(sockdir, 0o755)
    with pytest.raises(InsecurePathError, match=f"chmod 700 {sockdir}"):
        await transports.open_listener(str(sockdir / "a.sock"))
    assert not (sockdir / "a.sock").exists()


async def test_listener_refuses_a_symlinked_directory(sockdir: Path) -> None:
    real = sockdir / "real"
    real.mkdir(mode=0o700)
    (sockdir / "link").symlink_to(real)
    with pytest.raises(InsecurePathError, match="symbolic link"):
        await transports.open_listener(str(sockdir / "link" / "a.sock"))


async def test_squatting_regular_file_is_refused_and_kept(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    path.write_bytes(b"squatter")
    with pytest.raises(EndpointInUseError, match=str(path)):
        await transports.open_listener(str(path))
    assert path.read_bytes() == b"squatter"


async def test_squatting_symlink_is_refused_and_kept(sockdir: Path) -> None:
    target = sockdir / "target.sock"
    _stale_socket(target)  # even a link to a dead socket of ours is refused
    link = sockdir / "a.sock"
    link.symlink_to(target)
    with pytest.raises(EndpointInUseError, match="symbolic link"):
        await transports.open_listener(str(link))
    assert link.is_symlink()


async def test_live_socket_is_refused_and_keeps_working(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    with trio.fail_after(HANG_GUARD_S):
        first = await transports.open_listener(path)
        with pytest.raises(EndpointInUseError, match="in use"):
            await transports.open_listener(path)
        # The refused bind's liveness probe connected and hung up at once.
        probe = await first.accept()
        assert await probe.receive_some(1) == b""
        await probe.aclose()
        client = await transports.connect(path)
        server = await first.accept()
        await client.send_all(b"x")
        assert await server.receive_some(1) == b"x"
        await client.aclose()
        await server.aclose()
        await first.aclose()


async def test_live_socket_with_full_backlog_is_refused(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    with _raw_listener(path, 0):
        fillers = []
        try:
            while True:
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect(path)
        except BlockingIOError:
            pass
        try:
            with pytest.raises(EndpointInUseError, match="full backlog"):
                await transports.open_listener(path)
        finally:
            for filler in fillers:
                filler.close()
    assert lexists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a socket as another user")
async def test_dead_socket_of_another_user_is_refused(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    _stale_socket(path)
    os.chown(path, 65534, 65534, follow_symlinks=False)
    with pytest.raises(EndpointInUseError, match="owned by uid 65534"):
        await transports.open_listener(str(path))
    assert path.exists()


async def test_stale_socket_of_ours_is_replaced(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    _stale_socket(path)
    path.chmod(0o644)  # a marker: the replacement is created 0600
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(EndpointUnavailableError, match="nothing listens"):
            await transports.connect(str(path))
        listener = await transports.open_listener(str(path))
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        client = await transports.connect(str(path))
        server = await listener.accept()
        await client.aclose()
        await server.aclose()
        await listener.aclose()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/net/unix is Linux-only")
async def test_a_socket_bound_but_not_yet_listening_is_never_taken_for_dead(
    sockdir: Path,
) -> None:
    # Between bind() and listen() a live socket refuses connections like a dead one.
    path = sockdir / "a.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as starting:
        starting.bind(str(path))
        with pytest.raises(EndpointUnavailableError):
            await transports.connect(str(path))
        with pytest.raises(EndpointInUseError, match="bound to it and not yet listening"):
            await transports.open_listener(str(path))
        assert path.is_socket()
    listener = await transports.open_listener(str(path))  # closed now: dead, replaced
    await listener.aclose()


def _endpoint_name(tag: str, user: str | None = None) -> str:
    return f"rpb-v1-{user or transports.user_hash()}-be-{tag * 32}.sock"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a socket as another user")
def test_stale_sweep_removes_only_dead_backend_endpoints_of_ours(sockdir: Path) -> None:
    dead = [sockdir / _endpoint_name(tag) for tag in "ab"]
    for path in dead:
        _stale_socket(path)
    keep = {
        "live": sockdir / _endpoint_name("1"),
        "starting": sockdir / _endpoint_name("2"),
        "another user's": sockdir / _endpoint_name("3"),
        "regular file": sockdir / _endpoint_name("4"),
        "symlink": sockdir / _endpoint_name("5"),
        "other user hash": sockdir / _endpoint_name("6", "f" * 16),
        "not an endpoint name": sockdir / "broker.sock",
    }
    _stale_socket(keep["another user's"])
    os.chown(keep["another user's"], 65534, 65534)
    keep["regular file"].write_bytes(b"")
    keep["symlink"].symlink_to(dead[0])
    _stale_socket(keep["other user hash"])
    _stale_socket(keep["not an endpoint name"])
    with (
        _raw_listener(str(keep["live"]), 1),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as starting,
    ):
        starting.bind(str(keep["starting"]))
        before = {what: os.lstat(path) for what, path in keep.items()}
        removed = transports.remove_stale_backend_endpoints(sockdir)
        assert removed == sorted(str(path) for path in dead)
        assert not any(lexists(path) for path in dead)
        for what, path in keep.items():
            assert os.lstat(path).st_ino == before[what].st_ino, what
        assert transports.remove_stale_backend_endpoints(sockdir) == []


async def test_aclose_leaves_a_replaced_path_alone(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    listener = await transports.open_listener(str(path))
    path.unlink()
    path.write_bytes(b"someone else's")
    await listener.aclose()
    assert path.read_bytes() == b"someone else's"


async def test_aclose_wakes_a_pending_accept(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:

            async def accept_one() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await listener.accept()

            nursery.start_soon(accept_one)
            await trio.testing.wait_all_tasks_blocked()
            await listener.aclose()


async def test_listener_path_too_long(sockdir: Path) -> None:
    path = str(sockdir / ("x" * 120))
    with pytest.raises(EndpointNameError, match="limit"):
        await transports.open_listener(path)
    with pytest.raises(EndpointNameError, match="limit"):
        await transports.connect(path)


async def test_connect_to_missing_path(sockdir: Path) -> None:
    with pytest.raises(EndpointUnavailableError, match=str(sockdir)):
        await transports.connect(str(sockdir / "none.sock"))


async def test_connect_to_a_regular_file_is_unavailable(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_bytes(b"")
    with pytest.raises(EndpointUnavailableError):
        await transports.connect(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions")
async def test_connect_permission_denied_is_a_transport_error(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    os.chmod(sockdir, 0o000)
    try:
        with pytest.raises(TransportError) as info:
            await transports.connect(listener.path)
        assert not isinstance(info.value, EndpointUnavailableError)
    finally:
        os.chmod(sockdir, 0o700)
        await listener.aclose()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux refuses a full backlog with EAGAIN")
async def test_connect_waits_for_a_full_backlog_then_succeeds(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    with _raw_listener(path, 0) as raw:
        first = await transports.connect(path)  # takes the only backlog slot
        done = trio.Event()
        result: list[trio.SocketStream] = []

        async def second() -> None:
            result.append(await transports.connect(path))
            done.set()

        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
                accepted, _ = raw.accept()  # frees the slot
                await done.wait()
        accepted.close()
        await first.aclose()
        await result[0].aclose()


async def test_accept_reports_fd_exhaustion_and_recovers(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    client = await transports.connect(listener.path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        # Lower the limit just above the highest descriptor in use, then use up the rest.
        fd_dir = "/proc/self/fd" if sys.platform == "linux" else "/dev/fd"
        highest = max(int(name) for name in os.listdir(fd_dir))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
        try:
            while True:
                fillers.append(os.dup(0))
        except OSError:
            pass
        with trio.fail_after(HANG_GUARD_S):
            with pytest.raises(FdExhaustedError, match="out of file descriptors"):
                await listener.accept()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with trio.fail_after(HANG_GUARD_S):
        server = await listener.accept()  # the same pending connection, still there
        await client.send_all(b"ok")
        assert await server.receive_some(2) == b"ok"
    await server.aclose()
    await client.aclose()
    await listener.aclose()


async def test_peer_identity_of_an_in_process_client(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    with trio.fail_after(HANG_GUARD_S):
        client = await transports.connect(listener.path)
        server = await listener.accept()
    for stream in (client, server):
        identity = transports.peer_identity(stream)
        assert identity.pid == os.getpid()
        assert identity.user == transports.current_user()
    await client.aclose()
    await server.aclose()
    await listener.aclose()


async def test_peer_identity_refuses_non_unix_or_closed_streams() -> None:
    left, _right = trio.testing.memory_stream_pair()
    with pytest.raises(TransportError, match="SocketStream"):
        transports.peer_identity(left)
    inet = trio.SocketStream(trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with pytest.raises(TransportError, match="AF_UNIX"):
        transports.peer_identity(inet)
    await inet.aclose()
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    await stream.aclose()
    b.close()
    with pytest.raises(TransportError):
        transports.peer_identity(stream)
