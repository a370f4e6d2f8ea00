"""Unix transport: the control channel's framing and fd passing, within one process.

Both ends are real ``AF_UNIX`` socketpairs; raw ``sendmsg`` on a duplicate of one end
plays a misbehaving peer.
"""

from __future__ import annotations

import array
import errno
import gc
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

import transports
from transports import (
    CONTROL_CHANNEL_ENV,
    ChannelClosedError,
    ChannelProtocolError,
    ConnectionPassError,
    PassFailure,
    PassReceipt,
    TransportError,
)
from transports._unix import UnixControlChannel
from transports._unix_fdpass import classify_pass_errno, send_fd_with_token

HANG_GUARD_S = 10
TOKEN = bytes(range(16))
MAX_BODY = 1 << 24


def frame(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(4, "little") + body


@pytest.fixture
async def pair() -> AsyncIterator[tuple[UnixControlChannel, UnixControlChannel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left = UnixControlChannel(a, peer_pid=0)
    right = UnixControlChannel(b, peer_pid=0)
    try:
        yield left, right
    finally:
        await left.aclose()
        await right.aclose()


@contextmanager
def raw_end(channel: UnixControlChannel) -> Iterator[socket.socket]:
    """A blocking duplicate of the channel's socket, to write or read raw bytes."""
    dup = socket.socket(fileno=os.dup(channel.fileno()))
    try:
        yield dup
    finally:
        dup.close()


def rights(*fds: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def assert_eof_soon(sock: socket.socket) -> None:
    """The other end of ``sock`` is fully closed: a nonblocking read sees EOF now."""
    sock.setblocking(False)
    assert sock.recv(1) == b""


def fd_count() -> int:
    gc.collect()  # sockets dropped by earlier failures must not close mid-test
    count = transports.open_fd_count()
    assert count is not None
    return count


async def test_open_fd_count_tracks_descriptors() -> None:
    before = fd_count()
    r, w = os.pipe()
    assert fd_count() == before + 2
    os.close(r)
    os.close(w)
    assert fd_count() == before


async def test_frames_roundtrip_both_ways(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    with trio.fail_after(HANG_GUARD_S):
        await left.send_message(frame(b"hello"))
        await right.send_message(frame(b""))
        got = await right.receive_message(MAX_BODY)
        assert got.framed == frame(b"hello")
        assert got.passed is None
        assert (await left.receive_message(0)).framed == frame(b"")
    assert left.adopt_handle_value(5, TOKEN) is None


async def test_large_frame_with_concurrent_reader(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    body = os.urandom(3 << 20)  # far larger than the socket buffer
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send_message, frame(body))
            got = await right.receive_message(MAX_BODY)
    assert got.framed == frame(body)


async def test_concurrent_senders_never_interleave(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    senders, per_sender, size = 8, 4, 100_000
    received: list[bytes] = []
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:

            async def sender(tag: int) -> None:
                for _ in range(per_sender):
                    await left.send_message(frame(bytes([tag]) * size))

            for tag in range(senders):
                nursery.start_soon(sender, tag)
            for _ in range(senders * per_sender):
                received.append((await right.receive_message(MAX_BODY)).framed)
    counts = {tag: 0 for tag in range(senders)}
    for framed in received:
        body = framed[5:]
        assert len(body) == size
        assert body == bytes([body[0]]) * size
        counts[body[0]] += 1
    assert counts == {tag: per_sender for tag in range(senders)}


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x01\x00\x00", b"\x02\x00\x00\x00\x00", b"\x01\x02\x00\x00\x00a", frame(b"a") + b"b"],
)
async def test_send_message_rejects_malformed_frames(
    pair: tuple[UnixControlChannel, UnixControlChannel], bad: bytes
) -> None:
    left, right = pair
    with pytest.raises(ValueError):
        await left.send_message(bad)
    with raw_end(right) as raw:
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):
            raw.recv(1)  # nothing was sent


async def test_pass_connection_then_send_delivers_fd_token_and_frame(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    passed_stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    with trio.fail_after(HANG_GUARD_S):
        receipt = await left.pass_connection_then_send(passed_stream, TOKEN, frame(b"offer"))
        assert receipt == PassReceipt(handle_value=0, duplicated_handle=None)
        await passed_stream.aclose()  # the sender's copy goes right away
        await left.send_message(frame(b"after"))
        got = await right.receive_message(MAX_BODY)
        assert got.framed == frame(b"offer")
        assert got.passed is not None
        assert got.passed.token == TOKEN
        assert "redacted" in repr(got.passed)
        stream = got.passed.stream
        assert isinstance(stream, trio.SocketStream)
        assert not os.get_inheritable(stream.socket.fileno())
        far.sendall(b"through the passed fd")
        assert await stream.receive_some(100) == b"through the passed fd"
        await stream.send_all(b"back")
        assert far.recv(10) == b"back"
        after = await right.receive_message(MAX_BODY)
        assert after.framed == frame(b"after")
        assert after.passed is None
        await stream.aclose()
    far.close()


async def test_pass_connection_then_send_puts_token_and_offer_in_one_sendmsg(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    # The receiver is woken once: after the pass, the whole token packet and the
    # whole offer frame are already readable together, with the descriptor.
    left, right = pair
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    offer = frame(b"offer in the same packet")
    with trio.fail_after(HANG_GUARD_S):
        await left.pass_connection_then_send(stream, TOKEN, offer)
        await stream.aclose()
        raw = socket.socket(fileno=os.dup(right.fileno()))
        try:
            data, ancdata, _flags, _addr = raw.recvmsg(1024, socket.CMSG_SPACE(4), socket.MSG_PEEK)
        finally:
            raw.close()
        assert data == TOKEN + offer
        assert ancdata and ancdata[0][1] == socket.SCM_RIGHTS
        for peeked in array.array("i", ancdata[0][2]):
            os.close(peeked)  # a peek installs its own copy of the descriptor
        got = await right.receive_message(MAX_BODY)
        assert got.framed == offer and got.passed is not None
        await got.passed.stream.aclose()
    far.close()


async def test_a_malformed_built_offer_passes_nothing(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ConnectionPassError) as caught:
            await left.pass_connection_then_send(stream, TOKEN, lambda _receipt: b"junk")
        assert caught.value.kind is PassFailure.FAILED
        assert not caught.value.fd_may_have_reached_backend
        await left.send_message(frame(b"next"))
        got = await right.receive_message(MAX_BODY)
        assert got.framed == frame(b"next") and got.passed is None
        await stream.aclose()
    far.close()


async def test_pass_connection_then_send_builds_the_frame_from_the_receipt(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    seen: list[PassReceipt] = []

    def build(receipt: PassReceipt) -> bytes:
        seen.append(receipt)
        return frame(b"handle=%d" % receipt.handle_value)

    with trio.fail_after(HANG_GUARD_S):
        await left.pass_connection_then_send(stream, TOKEN, build)
        got = await right.receive_message(MAX_BODY)
    assert seen == [PassReceipt(0, None)]
    assert got.framed == frame(b"handle=0")
    assert got.passed is not None
    await got.passed.stream.aclose()
    await stream.aclose()
    far.close()


async def test_pass_connection_alone_then_frame(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    with trio.fail_after(HANG_GUARD_S):
        assert await left.pass_connection(stream, TOKEN) == PassReceipt(0, None)
        await left.send_message(frame(b"offer"))
        got = await right.receive_message(MAX_BODY)
    assert got.passed is not None and got.passed.token == TOKEN
    await got.passed.stream.aclose()
    await stream.aclose()
    far.close()


@pytest.mark.parametrize("token", [b"", b"short", bytes(17), "x" * 16])
async def test_pass_rejects_a_token_that_is_not_16_bytes(
    pair: tuple[UnixControlChannel, UnixControlChannel], token: bytes
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    with pytest.raises(ValueError, match="16 bytes"):
        await left.pass_connection(stream, token)
    with pytest.raises(ValueError, match="16 bytes"):
        await left.pass_connection_then_send(stream, token, frame(b"x"))
    with raw_end(right) as raw:
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):
            raw.recv(1)
    await stream.aclose()
    far.close()


async def test_pass_refuses_non_socket_and_closed_streams(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, _right = pair
    memory, _other = trio.testing.memory_stream_pair()
    with pytest.raises(ConnectionPassError) as info:
        await left.pass_connection(memory, TOKEN)
    assert info.value.kind is PassFailure.FAILED
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    await stream.aclose()
    far.close()
    with pytest.raises(ConnectionPassError, match="closed") as info:
        await left.pass_connection(stream, TOKEN)
    assert info.value.kind is PassFailure.FAILED


async def test_pass_to_a_closed_peer_is_backend_unavailable(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    await right.aclose()
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    with pytest.raises(ConnectionPassError) as info:
        await left.pass_connection(stream, TOKEN)
    assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE
    assert info.value.os_error == errno.EPIPE
    assert not info.value.fd_may_have_reached_backend
    with pytest.raises(ChannelClosedError):
        await left.send_message(frame(b"x"))
    # The caller's connection is untouched.
    await stream.send_all(b"still mine")
    assert far.recv(20) == b"still mine"
    await stream.aclose()
    far.close()


async def test_methods_after_local_close(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, _right = pair
    await left.aclose()
    await left.aclose()
    assert left.fileno() == -1
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    with pytest.raises(ConnectionPassError) as info:
        await left.pass_connection(stream, TOKEN)
    assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE
    with pytest.raises(ChannelClosedError):
        await left.send_message(frame(b"x"))
    with pytest.raises(ChannelClosedError):
        await left.receive_message(MAX_BODY)
    await stream.aclose()
    far.close()


def _fill(channel: UnixControlChannel) -> int:
    """Write raw filler bytes until the channel's send buffer is full; return the count."""
    total = 0
    with raw_end(channel) as raw:
        raw.setblocking(False)
        try:
            while True:
                total += raw.send(b"\0" * 65536)
        except BlockingIOError:
            pass
    return total


async def test_pass_waits_for_a_full_buffer_is_cancellable_then_completes(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
    filled = _fill(left)
    baseline = fd_count()
    with trio.fail_after(HANG_GUARD_S):
        # 1. It waits (no WOULD_BLOCK error) and a cancellation leaves nothing behind.
        finished = False
        async with trio.open_nursery() as nursery:

            async def blocked_pass() -> None:
                nonlocal finished
                await left.pass_connection(stream, TOKEN)
                finished = True

            nursery.start_soon(blocked_pass)
            await trio.testing.wait_all_tasks_blocked()
            assert not finished
            nursery.cancel_scope.cancel()
        assert not finished
        assert fd_count() == baseline
        # 2. Once the reader drains, a waiting pass goes through intact.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.pass_connection_then_send, stream, TOKEN, frame(b"offer"))
            await trio.testing.wait_all_tasks_blocked()
            with raw_end(right) as raw:
                remaining = filled
                while remaining:
                    remaining -= len(raw.recv(min(remaining, 65536)))
        got = await right.receive_message(MAX_BODY)
    assert got.framed == frame(b"offer")
    assert got.passed is not None and got.passed.token == TOKEN
    await got.passed.stream.aclose()
    await stream.aclose()
    far.close()


async def test_send_cancelled_mid_frame_shuts_the_channel(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send_message, frame(bytes(4 << 20)))
            await trio.testing.wait_all_tasks_blocked()  # part of it is in the buffer
            nursery.cancel_scope.cancel()
        with pytest.raises(ChannelClosedError, match="interrupted send"):
            await left.send_message(frame(b"x"))
        near, far = socket.socketpair()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(near))
        with pytest.raises(ConnectionPassError) as info:
            await left.pass_connection(stream, TOKEN)
        assert info.value.kind is PassFailure.BACKEND_UNAVAILABLE
        # The reader sees the truncated frame end in EOF rather than hanging.
        with pytest.raises(ChannelClosedError):
            await right.receive_message(MAX_BODY)
    await stream.aclose()
    far.close()


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (errno.EACCES, PassFailure.PERMISSION_DENIED),
        (errno.EPERM, PassFailure.PERMISSION_DENIED),
        (errno.ENOBUFS, PassFailure.WOULD_BLOCK),
        (errno.EAGAIN, PassFailure.WOULD_BLOCK),
        (errno.ECONNREFUSED, PassFailure.BACKEND_UNAVAILABLE),
        (errno.ECONNRESET, PassFailure.BACKEND_UNAVAILABLE),
        (errno.EPIPE, PassFailure.BACKEND_UNAVAILABLE),
        (errno.ENOTCONN, PassFailure.BACKEND_UNAVAILABLE),
        (errno.EBADF, PassFailure.FAILED),
        (errno.ETOOMANYREFS, PassFailure.FAILED),
        (None, PassFailure.FAILED),
    ],
)
def test_classify_pass_errno(err: int | None, kind: PassFailure) -> None:
    assert classify_pass_errno(err) is kind


class _ScriptedSocket:
    """A socket whose sendmsg returns or raises what the test says."""

    def __init__(self, result: int | OSError) -> None:
        self.result = result
        self.calls: list[tuple[list[bytes], list[tuple[int, int, bytes]], int]] = []

    def fileno(self) -> int:
        return -1

    def sendmsg(
        self, buffers: list[bytes], ancdata: list[tuple[int, int, bytes]], flags: int, /
    ) -> int:
        self.calls.append((buffers, ancdata, flags))
        if isinstance(self.result, OSError):
            raise self.result
        return self.result


async def test_send_is_one_sendmsg_with_the_token_and_the_fd() -> None:
    sock = _ScriptedSocket(16)
    await send_fd_with_token(sock, 7, TOKEN)
    ((buffers, ancdata, flags),) = sock.calls
    assert buffers == [TOKEN]
    assert ancdata == rights(7)
    assert flags & socket.MSG_DONTWAIT
    if hasattr(socket, "MSG_NOSIGNAL") and os.uname().sysname == "Linux":
        assert flags & socket.MSG_NOSIGNAL


async def test_partial_send_may_have_reached_the_backend() -> None:
    with pytest.raises(ConnectionPassError) as info:
        await send_fd_with_token(_ScriptedSocket(5), 7, TOKEN)
    assert info.value.kind is PassFailure.PARTIAL_SEND
    assert info.value.fd_may_have_reached_backend


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (errno.EACCES, PassFailure.PERMISSION_DENIED),
        (errno.ENOBUFS, PassFailure.WOULD_BLOCK),
        (errno.ECONNRESET, PassFailure.BACKEND_UNAVAILABLE),
        (errno.EINVAL, PassFailure.FAILED),
    ],
)
async def test_sendmsg_errors_are_classified(err: int, kind: PassFailure) -> None:
    with pytest.raises(ConnectionPassError) as info:
        await send_fd_with_token(_ScriptedSocket(OSError(err, os.strerror(err))), 7, TOKEN)
    assert info.value.kind is kind
    assert info.value.os_error == err
    assert not info.value.fd_may_have_reached_backend


async def test_bad_framing_byte_is_a_protocol_error_and_sticks(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    with raw_end(left) as raw:
        raw.sendall(b"\x02\x00\x00\x00\x00" + frame(b"ok"))
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ChannelProtocolError, match="framing byte 0x02"):
            await right.receive_message(MAX_BODY)
        with pytest.raises(ChannelProtocolError):
            await right.receive_message(MAX_BODY)


async def test_oversize_frame_is_refused_before_reading_the_body(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    with raw_end(left) as raw:
        raw.sendall(b"\x01" + (101).to_bytes(4, "little"))
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ChannelProtocolError, match="101 bytes exceeds the limit of 100"):
            await right.receive_message(100)


async def test_eof_at_a_boundary_and_mid_frame(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    await left.send_message(frame(b"last"))
    with raw_end(left) as raw:
        raw.sendall(b"\x01\x09\x00\x00\x00abc")  # truncated
    await left.aclose()
    with trio.fail_after(HANG_GUARD_S):
        assert (await right.receive_message(MAX_BODY)).framed == frame(b"last")
        with pytest.raises(ChannelClosedError, match="mid-message"):
            await right.receive_message(MAX_BODY)


async def test_eof_right_at_a_boundary(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    await left.aclose()
    with pytest.raises(ChannelClosedError, match="closed the control channel"):
        await right.receive_message(MAX_BODY)


async def test_eof_after_a_token_closes_the_received_fd(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    with raw_end(left) as raw:
        raw.sendmsg([TOKEN], rights(near.fileno()))
    near.close()  # only the in-flight copy keeps the connection open now
    await left.aclose()
    baseline = fd_count()
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ChannelClosedError):
            await right.receive_message(MAX_BODY)
    assert fd_count() == baseline
    assert_eof_soon(far)
    far.close()


async def test_short_token_then_eof_closes_the_received_fd(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    with raw_end(left) as raw:
        raw.sendmsg([TOKEN[:10]], rights(near.fileno()))
    near.close()
    await left.aclose()
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ChannelClosedError):
            await right.receive_message(MAX_BODY)
    assert_eof_soon(far)
    far.close()


async def test_extra_fds_in_one_packet_are_closed(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    pairs = [socket.socketpair() for _ in range(3)]
    with raw_end(left) as raw:
        raw.sendmsg([TOKEN], rights(*(near.fileno() for near, _ in pairs)))
        raw.sendall(frame(b"offer"))
    for near, _ in pairs:
        near.close()
    baseline = fd_count()
    with trio.fail_after(HANG_GUARD_S):
        got = await right.receive_message(MAX_BODY)
    assert got.passed is not None
    assert fd_count() == baseline + 1  # only the first descriptor was kept
    assert_eof_soon(pairs[1][1])
    assert_eof_soon(pairs[2][1])
    pairs[0][1].sendall(b"first")
    assert await got.passed.stream.receive_some(10) == b"first"
    await got.passed.stream.aclose()
    for _, far in pairs:
        far.close()


async def test_a_superseded_token_packet_is_discarded(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    (old_near, old_far), (new_near, new_far) = socket.socketpair(), socket.socketpair()
    other_token = bytes(reversed(TOKEN))
    with raw_end(left) as raw:
        raw.sendmsg([other_token], rights(old_near.fileno()))  # a cancelled sender's leftover
        raw.sendmsg([TOKEN], rights(new_near.fileno()))
        raw.sendall(frame(b"offer"))
    old_near.close()
    new_near.close()
    with trio.fail_after(HANG_GUARD_S):
        got = await right.receive_message(MAX_BODY)
    assert got.passed is not None and got.passed.token == TOKEN
    assert_eof_soon(old_far)
    new_far.sendall(b"new")
    assert await got.passed.stream.receive_some(10) == b"new"
    await got.passed.stream.aclose()
    old_far.close()
    new_far.close()


async def test_fd_inside_a_message_is_a_protocol_error(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    near, far = socket.socketpair()
    with raw_end(left) as raw:
        raw.sendall(b"\x01" + (20).to_bytes(4, "little") + b"1234")
        raw.sendmsg([TOKEN], rights(near.fileno()))
    near.close()
    baseline = fd_count()
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ChannelProtocolError, match="middle of a message"):
            await right.receive_message(MAX_BODY)
    assert fd_count() == baseline
    assert_eof_soon(far)
    far.close()


async def test_a_passed_non_socket_is_a_protocol_error(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    left, right = pair
    r, w = os.pipe()
    with raw_end(left) as raw:
        raw.sendmsg([TOKEN], rights(r))
        raw.sendall(frame(b"offer"))
    os.close(r)
    baseline = fd_count()
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(ChannelProtocolError, match="not a stream socket"):
            await right.receive_message(MAX_BODY)
    assert fd_count() == baseline
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")  # the read end is gone everywhere
    os.close(w)


async def test_only_one_receiver_at_a_time(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    _left, right = pair
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(right.receive_message, MAX_BODY)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await right.receive_message(MAX_BODY)
            nursery.cancel_scope.cancel()


async def test_aclose_wakes_a_waiting_receiver(
    pair: tuple[UnixControlChannel, UnixControlChannel],
) -> None:
    _left, right = pair
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:

            async def receiver() -> None:
                with pytest.raises(ChannelClosedError):
                    await right.receive_message(MAX_BODY)

            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await right.aclose()


async def test_open_control_pair_child_end() -> None:
    channel, control = transports.open_control_pair()
    fd = control.fileno()
    assert dict(control.env) == {CONTROL_CHANNEL_ENV: f"fd:{fd}"}
    assert not os.get_inheritable(fd)  # only spawn_child's pass_fds hands it on
    assert not os.get_inheritable(channel.fileno())
    assert channel.peer_pid == 0
    control.close()
    control.close()
    with pytest.raises(ValueError):
        control.fileno()
    await channel.aclose()


async def test_inherited_channel_from_an_explicit_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socket.socketpair()
    monkeypatch.setenv(CONTROL_CHANNEL_ENV, "fd:999")  # must be left alone
    channel = await transports.open_inherited_control_channel(
        {CONTROL_CHANNEL_ENV: f"fd:{b.fileno()}"}
    )
    b.detach()  # the channel owns the descriptor now
    assert os.environ[CONTROL_CHANNEL_ENV] == "fd:999"
    assert channel.peer_pid == os.getpid()  # a socketpair's creator
    a.sendall(frame(b"hi"))
    with trio.fail_after(HANG_GUARD_S):
        assert (await channel.receive_message(10)).framed == frame(b"hi")
    await channel.aclose()
    a.close()


async def test_inherited_channel_from_os_environ_removes_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socket.socketpair()
    os.set_inheritable(b.fileno(), True)
    monkeypatch.setenv(CONTROL_CHANNEL_ENV, f"fd:{b.fileno()}")
    channel = await transports.open_inherited_control_channel()
    b.detach()
    assert CONTROL_CHANNEL_ENV not in os.environ
    assert not os.get_inheritable(channel.fileno())
    with pytest.raises(TransportError, match="not set"):
        await transports.open_inherited_control_channel()
    await channel.aclose()
    a.close()


@pytest.mark.parametrize("value", ["", "3", "fd:", "fd:-1", "fd:abc", "fd:3 ", "pipe:3"])
async def test_inherited_channel_rejects_malformed_values(value: str) -> None:
    with pytest.raises(TransportError, match="fd:<n>"):
        await transports.open_inherited_control_channel({CONTROL_CHANNEL_ENV: value})


async def test_inherited_channel_rejects_bad_descriptors() -> None:
    with pytest.raises(TransportError, match="not set"):
        await transports.open_inherited_control_channel({})
    with pytest.raises(TransportError, match="standard stream"):
        await transports.open_inherited_control_channel({CONTROL_CHANNEL_ENV: "fd:1"})
    r, w = os.pipe()
    os.close(w)
    closed = w
    with pytest.raises(TransportError, match="not open"):
        await transports.open_inherited_control_channel({CONTROL_CHANNEL_ENV: f"fd:{closed}"})
    with pytest.raises(TransportError, match="not a socket"):
        await transports.open_inherited_control_channel({CONTROL_CHANNEL_ENV: f"fd:{r}"})
    os.fstat(r)  # left open: not ours to close
    os.close(r)
    inet = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(TransportError, match="not an AF_UNIX stream socket"):
        await transports.open_inherited_control_channel(
            {CONTROL_CHANNEL_ENV: f"fd:{inet.fileno()}"}
        )
    assert inet.fileno() >= 0
    os.fstat(inet.fileno())
    inet.close()
