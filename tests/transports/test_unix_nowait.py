"""Reading, writing and closing a real Unix socket connection without waiting."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from transports import close_now, receive_now, send_now

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets")


def _pair() -> tuple[socket.socket, trio.SocketStream]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    return ours, trio.SocketStream(trio.socket.from_stdlib_socket(theirs))


async def test_receive_now_takes_only_what_is_asked_and_only_what_is_there() -> None:
    peer, stream = _pair()
    with peer:
        assert receive_now(stream, 5) is None, "nothing waiting yet"
        peer.sendall(b"headerbody")
        assert receive_now(stream, 6) == b"header"
        assert receive_now(stream, 100) == b"body"
        assert receive_now(stream, 100) is None
        peer.sendall(b"rest")
        assert await stream.receive_some(100) == b"rest", "the stream still works"
        peer.shutdown(socket.SHUT_WR)
        assert receive_now(stream, 100) == b"", "end of stream"
        await stream.aclose()


async def test_send_now_writes_what_fits_and_reports_a_gone_peer() -> None:
    peer, stream = _pair()
    with peer:
        assert send_now(stream, b"reply") == 5
        assert peer.recv(5) == b"reply"
        peer.setblocking(False)
        big = b"x" * (1 << 22)
        written = send_now(stream, big)
        assert 0 < written < len(big), "a full buffer takes a short write"
        assert send_now(stream, big) == 0, "and then nothing"
    with pytest.raises(trio.BrokenResourceError):
        send_now(stream, b"after the peer closed")
    await stream.aclose()


async def test_receive_now_reports_a_reset_connection() -> None:
    peer, stream = _pair()
    await stream.send_all(b"unread by the peer")
    peer.close()  # closing with unread bytes resets the connection
    with pytest.raises(trio.BrokenResourceError):
        receive_now(stream, 1)
    await stream.aclose()


async def test_close_now_closes_and_other_streams_are_left_alone() -> None:
    peer, stream = _pair()
    with peer:
        assert close_now(stream) is True
        assert stream.socket.fileno() == -1
        assert peer.recv(1) == b""
        assert receive_now(stream, 1) is None, "a closed stream has nothing to take"
        assert send_now(stream, b"x") == 0
    memory, _ = trio.testing.memory_stream_pair()
    assert close_now(memory) is False
    assert receive_now(memory, 1) is None
    assert send_now(memory, b"x") == 0
