"""The few pieces the minimal servers share: a lean Unix stream, listening, replies.

What this does: ``LeanUnixStream`` is a ``trio.abc.HalfCloseableStream`` over a
nonblocking ``AF_UNIX`` socket that tries each ``recv``/``send`` first and waits
for readiness only on EAGAIN, with trio's checkpoint contract (a cancellation
point before, a yield after); unlike ``trio.SocketStream`` it issues no TCP-only
``setsockopt`` calls that fail on a Unix socket. ``listen_unix`` binds a
listening socket; ``negotiated_frame`` encodes the broker's ``Negotiated`` reply
with rpbroker's own wire code, so every server answers with the same bytes;
``read_frame_nowait`` reads one frame without blocking and without reading past
it.

What it does not do: guard against concurrent senders, half-written frames or
hostile peers beyond what a bound needs; these servers are measured, not deployed.
"""

from __future__ import annotations

import os
import socket
import struct

import trio

from rpbroker.wire import Frame, HelloReply, Negotiated
from rpbroker.wire.codes import PROTOCOL_VERSION, Capability
from rpbroker.wire.frames import encode, framed, response_to
from rpbroker.wire.framing import FRAME_HEADER_BYTES
from rpbroker.wire.protocols import PayloadProtocol

#: Listen backlog, connections: the broker's own (``transports``) value.
LISTEN_BACKLOG = 512
#: recv size for the echo handler, bytes.
RECV_BYTES = 65536
#: Keepalive the broker negotiates when the client sent 0, seconds (SPEC §4).
DEFAULT_KEEPALIVE_SECS = 1800
#: Flags for sends: never SIGPIPE.
SEND_FLAGS = socket.MSG_NOSIGNAL
#: ``struct ucred`` (pid, uid, gid) for ``SO_PEERCRED``.
_UCRED = struct.Struct("3i")
_HEADER = struct.Struct("<BI")


def listen_unix(path: str) -> socket.socket:
    """A nonblocking listening ``AF_UNIX`` socket bound at ``path`` (mode 0600)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The connecting peer's uid, from the kernel (``SO_PEERCRED``)."""
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


def negotiated_frame(
    request: Frame | None, endpoint: str, connection_id: int, token: bytes = b""
) -> bytes:
    """The framed ``HelloReply{negotiated}`` the broker sends, echoing ``request``."""
    negotiated = Negotiated(
        negotiated_protocol=PROTOCOL_VERSION,
        daemon_version="1.0.0",
        backend_pipe=endpoint,
        server_capabilities=int(Capability.HANDLE_PASSING) if token else 0,
        keepalive_interval_secs=DEFAULT_KEEPALIVE_SECS,
        handle_passed_token=token,
        connection_id=connection_id,
    )
    if request is None:
        request = Frame(envelope_version=PROTOCOL_VERSION, request_id=1)
    reply = response_to(
        request, encode(HelloReply(negotiated=negotiated)), payload_protocol=PayloadProtocol.CONTROL
    )
    return framed(reply)


def read_frame_nowait(sock: socket.socket, got: bytearray) -> bytes | None:
    """Add what ``sock`` has to ``got`` without reading past one frame.

    Returns the frame body once complete, ``None`` if more must be waited for.
    Raises ``EOFError`` if the peer closed first and ``ValueError`` for a bad
    framing byte.
    """
    while True:
        if len(got) < FRAME_HEADER_BYTES:
            want = FRAME_HEADER_BYTES - len(got)
        else:
            framing, length = _HEADER.unpack_from(got)
            if framing != 1:
                raise ValueError("bad framing byte")
            want = FRAME_HEADER_BYTES + length - len(got)
            if want == 0:
                return bytes(got[FRAME_HEADER_BYTES:])
        try:
            chunk = sock.recv(want)
        except BlockingIOError:
            return None
        if not chunk:
            raise EOFError("peer closed before a whole frame")
        got += chunk


class LeanUnixStream(trio.abc.HalfCloseableStream):
    """A trio stream over a nonblocking ``AF_UNIX`` socket, with no TCP-only set-up.

    Cancellation: ``receive_some`` and ``send_all`` are checkpoints, as trio's own
    streams: cancellable while waiting, a yield after success.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = self.sock.recv(max_bytes or RECV_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view, SEND_FLAGS) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()


async def echo(stream: trio.abc.Stream) -> None:
    """The echo service: every byte received is sent back.

    Cancellation: stops at once; the caller closes the stream.
    """
    while data := await stream.receive_some():
        await stream.send_all(data)
