"""Unix transport: cancellation at each await leaves no descriptor behind.

Each test counts the process's descriptors (``open_fd_count``) before and after a
cancelled operation. Cancellation is either pre-armed (the operation must not start)
or delivered while the operation is provably blocked (``wait_all_tasks_blocked``).
"""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import transports
from transports import CONTROL_CHANNEL_ENV, ChannelProtocolError
from transports._unix import UnixControlChannel

HANG_GUARD_S = 10
TOKEN = bytes(range(16))
MAX_BODY = 1 << 20


def frame(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(4, "little") + body


def lexists(path: str | Path) -> bool:
    """Whether anything (even a dangling link) is at ``path``."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def fd_count() -> int:
    gc.collect()
    count = transports.open_fd_count()
    assert count is not None
    return count


@contextmanager
def no_new_descriptors() -> Iterator[None]:
    before = fd_count()
    yield
    assert fd_count() == before


async def cancelled_before_start(operation: Callable[[], Awaitable[object]]) -> None:
    """Run ``operation`` in an already-cancelled scope; it must raise Cancelled."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await operation()
        pytest.fail("the operation did not notice the cancellation")  # pragma: no cover
    assert scope.cancelled_caught


async def cancelled_while_blocked(operation: Callable[[], Awaitable[object]]) -> None:
    """Start ``operation``, wait until it blocks, cancel it; it must not have finished."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await operation()
        finished = True

    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert not finished


@contextmanager
def control_pair() -> Iterator[tuple[UnixControlChannel, UnixControlChannel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = UnixControlChannel(a, peer_pid=0), UnixControlChannel(b, peer_pid=0)
    try:
        yield left, right
    finally:
        a.close()
        b.close()


@contextmanager
def raw_end(channel: UnixControlChannel) -> Iterator[socket.socket]:
    dup = socket.socket(fileno=os.dup(channel.fileno()))
    try:
        yield dup
    finally:
        dup.close()


def fill(channel: UnixControlChannel) -> int:
    total = 0
    with raw_end(channel) as raw:
        raw.setblocking(False)
        try:
            while True:
                total += raw.send(b"\0" * 65536)
        except BlockingIOError:
            pass
    return total


def drain(channel: UnixControlChannel, count: int) -> None:
    with raw_end(channel) as raw:
        while count:
            count -= len(raw.recv(min(count, 65536)))


async def test_open_listener_cancelled_before_binding(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    with no_new_descriptors():
        await cancelled_before_start(lambda: transports.open_listener(path))
    assert not lexists(path)


async def test_accept_cancelled_while_waiting(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    with no_new_descriptors():
        await cancelled_before_start(listener.accept)
        await cancelled_while_blocked(listener.accept)
    # Still usable afterwards.
    with trio.fail_after(HANG_GUARD_S):
        client = await transports.connect(listener.path)
        server = await listener.accept()
    for stream in (client, server):
        await stream.aclose()
    await listener.aclose()


async def test_listener_aclose_completes_even_when_cancelled(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    before = fd_count()
    with trio.CancelScope() as scope:
        scope.cancel()
        await listener.aclose()
    assert fd_count() == before - 1
    assert not lexists(listener.path)


async def test_connect_cancelled_before_starting(sockdir: Path) -> None:
    listener = await transports.open_listener(str(sockdir / "a.sock"))
    with no_new_descriptors():
        await cancelled_before_start(lambda: transports.connect(listener.path))
    await listener.aclose()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux refuses a full backlog with EAGAIN")
async def test_connect_cancelled_while_the_backlog_is_full(sockdir: Path) -> None:
    path = str(sockdir / "a.sock")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.bind(path)
    raw.listen(0)
    first = await transports.connect(path)  # takes the only slot
    with no_new_descriptors():
        await cancelled_while_blocked(lambda: transports.connect(path))
    await first.aclose()
    raw.close()


async def test_pass_cancelled_before_sending_sends_nothing() -> None:
    with control_pair() as (left, right):
        near, far = socket.socketpair()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
        with no_new_descriptors():
            await cancelled_before_start(lambda: left.pass_connection(stream, TOKEN))
        with raw_end(right) as raw:
            raw.setblocking(False)
            with pytest.raises(BlockingIOError):
                raw.recv(1)
        await stream.aclose()
        far.close()


async def test_send_cancelled_before_the_first_byte_keeps_the_channel_usable() -> None:
    with control_pair() as (left, right):
        filled = fill(left)
        with no_new_descriptors():
            await cancelled_while_blocked(lambda: left.send_message(frame(b"blocked")))
        drain(right, filled)
        with trio.fail_after(HANG_GUARD_S):
            await left.send_message(frame(b"after"))
            assert (await right.receive_message(MAX_BODY)).framed == frame(b"after")


async def test_receive_cancelled_at_a_boundary_keeps_the_channel_usable() -> None:
    with control_pair() as (left, right):
        with no_new_descriptors():
            await cancelled_before_start(lambda: right.receive_message(MAX_BODY))
            await cancelled_while_blocked(lambda: right.receive_message(MAX_BODY))
        with trio.fail_after(HANG_GUARD_S):
            await left.send_message(frame(b"next"))
            assert (await right.receive_message(MAX_BODY)).framed == frame(b"next")


async def test_receive_cancelled_between_token_and_frame_closes_the_fd() -> None:
    with control_pair() as (left, right):
        near, far = socket.socketpair()
        with raw_end(left) as raw:
            raw.sendmsg(
                [TOKEN],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [near.fileno()]))],
            )
        near.close()
        with no_new_descriptors():
            await cancelled_while_blocked(lambda: right.receive_message(MAX_BODY))
        far.setblocking(False)
        assert far.recv(1) == b""  # the received copy was closed
        far.close()
        with pytest.raises(ChannelProtocolError, match="interrupted"):
            await right.receive_message(MAX_BODY)


async def test_receive_cancelled_mid_body_breaks_the_channel() -> None:
    with control_pair() as (left, right):
        with raw_end(left) as raw:
            raw.sendall(b"\x01" + (10).to_bytes(4, "little") + b"abc")
        with no_new_descriptors():
            await cancelled_while_blocked(lambda: right.receive_message(MAX_BODY))
        with pytest.raises(ChannelProtocolError):
            await right.receive_message(MAX_BODY)


async def test_wait_cancelled_then_reaped_closes_the_pidfd(child_env: dict[str, str]) -> None:
    with no_new_descriptors():
        channel, control = transports.open_control_pair()
        child = await transports.spawn_child(
            [sys.executable, "-c", "import signal; signal.pause()"], child_env, control
        )
        await cancelled_before_start(child.wait)
        await cancelled_while_blocked(child.wait)
        child.kill_tree()
        with trio.fail_after(HANG_GUARD_S):
            assert await child.wait() == -signal.SIGKILL
        await channel.aclose()


async def test_spawn_cancelled_before_forking(child_env: dict[str, str]) -> None:
    with no_new_descriptors():
        channel, control = transports.open_control_pair()
        await cancelled_before_start(
            lambda: transports.spawn_child([sys.executable, "-c", "pass"], child_env, control)
        )
        with pytest.raises(ValueError):
            control.fileno()  # consumed and closed
        await channel.aclose()


async def test_open_inherited_cancelled_adopts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    monkeypatch.setenv(CONTROL_CHANNEL_ENV, f"fd:{b.fileno()}")
    with no_new_descriptors():
        await cancelled_before_start(transports.open_inherited_control_channel)
    assert os.environ[CONTROL_CHANNEL_ENV] == f"fd:{b.fileno()}"
    os.fstat(b.fileno())
    a.close()
    b.close()
