"""The broker-to-backend control channel on Unix: a persistent socketpair.

What this module does: ``open_control_pair`` creates an ``AF_UNIX`` stream
socketpair before a backend is spawned; the broker keeps one end as a
``UnixControlChannel`` and the child inherits the other (named in its environment
as ``fd:<n>``), which it adopts with ``open_inherited_control_channel``. Both ends
exchange v1 frames (``0x01``, u32 LE length, body). A connection is passed as one
``SCM_RIGHTS`` packet whose 16 data bytes are the handoff token, sent immediately
before the frame that offers it; the receiver reads at most a header's worth at
every message boundary and never past a boundary, so a descriptor is always found
where a message starts and is returned together with the next frame.

What it does not do: decode frames (bodies are opaque), validate tokens, or decide
whether to adopt a passed connection: the receiver owns ``ReceivedMessage.passed``
and closes it if it does not adopt it.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_control is part of the Unix transport"

import contextlib
import errno
import os
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping

import trio

from transports._interface import (
    CONTROL_CHANNEL_ENV,
    FRAME_HEADER_BYTES,
    FRAMING_BYTE,
    HANDOFF_TOKEN_BYTES,
    ChannelClosedError,
    ChannelProtocolError,
    ConnectionPassError,
    PassedConnection,
    PassFailure,
    PassReceipt,
    ReceivedMessage,
    TransportError,
)
from transports._unix_fdpass import (
    RECV_ANCILLARY_BYTES,
    check_token,
    connection_fd,
    fds_from_ancillary,
    send_fd_with_token,
    write_all_to_fd,
)
from transports._unix_fds import (
    MIN_NON_STDIO_FD,
    above_stdio,
    close_fd_quietly,
    close_socket_quietly,
    stream_from_fd,
)
from transports._unix_peer import socket_peer_identity

#: v1 frame header: framing byte, u32 little-endian body length.
_HEADER = struct.Struct("<BI")

#: Flags for plain sends: report a dead peer as EPIPE instead of SIGPIPE (Linux).
if sys.platform == "linux":
    _PLAIN_SEND_FLAGS = socket.MSG_NOSIGNAL
    #: Received descriptors are created close-on-exec atomically.
    _RECV_FLAGS = socket.MSG_CMSG_CLOEXEC
else:
    _PLAIN_SEND_FLAGS = 0
    _RECV_FLAGS = 0

#: errnos of send/recv meaning the peer is gone.
_PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED})

#: What passing a descriptor produces on Unix: it travels in ``SCM_RIGHTS``, so there
#: is no handle value and nothing is left in the receiver's table on failure.
_UNIX_RECEIPT = PassReceipt(handle_value=0, duplicated_handle=None)

#: Value format of ``CONTROL_CHANNEL_ENV``: ``fd:<decimal descriptor>``.
_ENV_VALUE = re.compile(r"fd:([0-9]{1,9})")


class UnixControlChannel:
    """One end of a control socketpair (implements ``ControlChannel``).

    Sends are serialized by a ``trio.Lock``; one task may receive while others
    send. Errors are typed: ``ChannelClosedError`` once the peer is gone or the
    channel was closed locally, ``ChannelProtocolError`` for malformed input,
    ``ConnectionPassError`` from the passing methods.
    """

    def __init__(self, sock: socket.socket, *, peer_pid: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._peer_pid = peer_pid
        self._send_lock = trio.Lock()
        self._receiving = False
        self._closed = False
        self._send_broken: str | None = None
        self._receive_broken: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<UnixControlChannel {state} peer_pid={self._peer_pid}>"

    @property
    def peer_pid(self) -> int:
        """The pid at the other end: the spawned child (broker side), the broker (child side).

        0 until ``spawn_child`` has started the child on the broker side: a
        socketpair's kernel credentials name its creator, not the child.
        """
        return self._peer_pid

    def bind_child_pid(self, pid: int) -> None:
        """Record the pid of the child that holds the other end (called by ``spawn_child``)."""
        self._peer_pid = pid

    def fileno(self) -> int:
        """The channel's descriptor (-1 once closed); for diagnostics and tests."""
        return self._sock.fileno()

    def adopt_handle_value(self, handle_value: int, token: bytes) -> PassedConnection | None:
        """Always ``None`` on Unix: connections arrive with ``receive_message``."""
        return None

    # -- sending -------------------------------------------------------------------

    async def send_message(self, framed: bytes) -> None:
        """Send one complete v1 frame.

        Raises ``ValueError`` if ``framed`` is not exactly one well-formed frame and
        ``ChannelClosedError`` if the peer is gone or the channel is closed.

        Cancellation: safe before the first byte is written. If cancelled after a
        partial write the stream would be corrupt, so the channel's sending side
        is shut down (the peer sees EOF) and later sends raise ``ChannelClosedError``.
        """
        _check_frame(framed)
        async with self._send_lock:
            await self._send_all(framed)

    async def pass_connection(self, connection: trio.abc.Stream, token: bytes) -> PassReceipt:
        """Send ``connection``'s descriptor with ``token`` in one ``SCM_RIGHTS`` packet.

        The caller keeps (and must close) its copy. Raises ``ValueError`` for a
        token that is not 16 bytes and ``ConnectionPassError`` for every failure.
        Returns ``PassReceipt(handle_value=0, duplicated_handle=None)``.

        Cancellation: safe while waiting for buffer space (nothing sent); closes
        nothing of the caller's.
        """
        check_token(token)
        fd = connection_fd(connection)
        async with self._send_lock:
            receipt, _ = await self._pass_locked(fd, token)
            return receipt

    async def pass_connection_then_send(
        self,
        connection: trio.abc.Stream,
        token: bytes,
        framed: bytes | Callable[[PassReceipt], bytes],
        *,
        preface: bytes = b"",
    ) -> PassReceipt:
        """Write ``preface`` on ``connection``, pass it with ``token``, then send a frame.

        This is how a handoff offer must be sent: the receiver pairs the passed
        descriptor with the frame that follows it, and nothing else is sent on the
        channel in between. ``preface`` (the broker's reply to the client) is
        written on the connection itself before it leaves, so it precedes anything
        the receiver writes there. ``framed`` is the frame, or a function building
        it from the ``PassReceipt`` (so platform-neutral code can put
        ``handle_value`` in the offer; on Unix the receipt is known in advance, so
        the frame is built first and rides in the token packet's ``sendmsg``: the
        receiver wakes once for both). When no buffer is full the preface and the
        packet go out in one scheduler slice, with a single checkpoint at the end.

        Raises ``ValueError`` for a bad token or a bad ``framed`` bytes argument
        (nothing sent); ``trio.BrokenResourceError`` if the preface cannot be
        written (nothing passed); ``ConnectionPassError`` otherwise: ``FAILED``
        for a malformed built frame (nothing passed), and, once the descriptor
        went out, ``BACKEND_UNAVAILABLE`` with ``fd_may_have_reached_backend=True``
        when the rest of the frame cannot be sent. Exceptions raised by the
        builder propagate unchanged.

        Cancellation: safe while waiting to write the preface or for channel buffer
        space (nothing passed). A cancellation between the pass and the frame
        leaves an unpaired token packet; the receiver closes its descriptor when
        another token packet follows, or returns it with the next frame, whose
        token will not match (receivers must close a passed connection that does
        not come with the matching offer).
        """
        check_token(token)
        if isinstance(framed, bytes):
            _check_frame(framed)
        fd = connection_fd(connection)
        await trio.lowlevel.checkpoint_if_cancelled()
        if preface:
            await write_all_to_fd(fd, preface)
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            # On Unix the receipt is known before the pass (the descriptor travels
            # in SCM_RIGHTS, no handle value), so the offer frame is built first
            # and rides in the same sendmsg as the token packet.
            frame = framed if isinstance(framed, bytes) else framed(_UNIX_RECEIPT)
            try:
                _check_frame(frame)
            except ValueError as exc:
                raise ConnectionPassError(
                    PassFailure.FAILED, f"the offer frame is malformed (nothing passed): {exc}"
                ) from exc
            receipt, rode = await self._pass_locked(fd, token, trailer=frame)
            try:
                await self._send_all(frame[rode:])
            except TransportError as exc:
                raise ConnectionPassError(
                    PassFailure.BACKEND_UNAVAILABLE,
                    f"the descriptor was sent but its offer frame was not: {exc}",
                    fd_may_have_reached_backend=True,
                ) from exc
            return receipt
        finally:
            lock.release()

    async def _pass_locked(
        self, fd: int, token: bytes, *, trailer: bytes = b""
    ) -> tuple[PassReceipt, int]:
        """Send the token packet (with ``trailer`` in the same ``sendmsg`` when it fits).

        Returns the receipt and how many trailer bytes went out; the caller holds
        the send lock and sends the rest.

        Cancellation: as ``send_fd_with_token`` (safe until the packet is sent).
        """
        if self._closed or self._send_broken is not None:
            await trio.lowlevel.checkpoint()
            reason = "closed" if self._closed else self._send_broken
            raise ConnectionPassError(
                PassFailure.BACKEND_UNAVAILABLE, f"the control channel is {reason}"
            )
        try:
            rode = await send_fd_with_token(
                self._sock, fd, token, trailer=trailer, final_checkpoint=not trailer
            )
        except ConnectionPassError as exc:
            if exc.kind is PassFailure.PARTIAL_SEND:
                self._break_sending("broken by a partial token packet")
            raise
        except trio.ClosedResourceError as exc:
            raise ConnectionPassError(
                PassFailure.BACKEND_UNAVAILABLE, "the control channel was closed"
            ) from exc
        return _UNIX_RECEIPT, rode

    async def _send_all(self, data: bytes) -> None:
        """Write all of ``data``; the caller holds the send lock.

        Cancellation: safe before the first byte; after a partial write the
        sending side is shut down (``_break_sending``).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise ChannelClosedError("the control channel is closed")
        if self._send_broken is not None:
            await trio.lowlevel.checkpoint()
            raise ChannelClosedError(f"the control channel is {self._send_broken}")
        view = memoryview(data)
        sent = 0
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            while sent < len(view):
                try:
                    sent += self._sock.send(view[sent:], _PLAIN_SEND_FLAGS)
                except BlockingIOError:
                    await self._wait(trio.lowlevel.wait_writable)
                except OSError as exc:
                    raise self._os_error("send", exc) from exc
        except BaseException:
            if 0 < sent < len(view):
                self._break_sending("broken by an interrupted send")
            raise
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _break_sending(self, reason: str) -> None:
        """Stop all further sends and let the peer see EOF: the byte stream is corrupt."""
        self._send_broken = reason
        if not self._closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    # -- receiving -----------------------------------------------------------------

    async def receive_message(self, max_body: int) -> ReceivedMessage:
        """Receive the next frame (body at most ``max_body`` bytes), with any passed connection.

        A token packet (data with ``SCM_RIGHTS``) is paired with the frame that
        follows it and returned as ``passed``; a second token packet before a
        frame replaces the first, whose descriptor is closed. Extra descriptors
        in one packet are closed. Raises ``ChannelClosedError`` at EOF (closing a
        received but unreturned descriptor) and ``ChannelProtocolError`` for a
        bad framing byte, an oversize length, a descriptor inside a message, or a
        passed descriptor that is not a stream socket. Only one task may receive
        at a time (``trio.BusyResourceError``).

        Cancellation: safe while waiting for the start of a message (nothing is
        consumed). If cancelled part-way through a message, any received
        descriptor is closed and the channel refuses further receives with
        ``ChannelProtocolError``.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this control channel")
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise ChannelClosedError("the control channel is closed")
        if self._receive_broken is not None:
            await trio.lowlevel.checkpoint()
            raise ChannelProtocolError(f"the control channel is {self._receive_broken}")
        self._receiving = True
        stashed_fd: int | None = None
        mid_message = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            token = b""
            while True:
                head = bytearray(FRAME_HEADER_BYTES)
                got, fds = await self._recv_into(memoryview(head))
                if got == 0:
                    for fd in fds:
                        close_fd_quietly(fd)
                    raise ChannelClosedError("the peer closed the control channel")
                mid_message = True
                if fds:
                    for extra in fds[1:]:
                        close_fd_quietly(extra)
                    if stashed_fd is not None:
                        close_fd_quietly(stashed_fd)  # an unpaired, superseded token packet
                    stashed_fd = fds[0]
                    packet = bytearray(HANDOFF_TOKEN_BYTES)
                    packet[:got] = head[:got]
                    await self._recv_exactly(memoryview(packet)[got:])
                    token = bytes(packet)
                    continue
                await self._recv_exactly(memoryview(head)[got:])
                framing, length = _HEADER.unpack(head)
                if framing != FRAMING_BYTE:
                    raise ChannelProtocolError(
                        f"bad framing byte 0x{framing:02x} (expected 0x{FRAMING_BYTE:02x})"
                    )
                if length > max_body:
                    raise ChannelProtocolError(
                        f"frame body of {length} bytes exceeds the limit of {max_body}"
                    )
                framed = bytearray(FRAME_HEADER_BYTES + length)
                framed[:FRAME_HEADER_BYTES] = head
                await self._recv_exactly(memoryview(framed)[FRAME_HEADER_BYTES:])
                passed: PassedConnection | None = None
                if stashed_fd is not None:
                    fd, stashed_fd = stashed_fd, None
                    try:
                        stream = stream_from_fd(fd)  # owns fd from here, even on failure
                    except (OSError, ValueError) as exc:
                        raise ChannelProtocolError(
                            f"the passed descriptor is not a stream socket: {exc}"
                        ) from exc
                    passed = PassedConnection(token=token, stream=stream)
                mid_message = False
                break
        except BaseException as exc:
            if stashed_fd is not None:
                close_fd_quietly(stashed_fd)
            if mid_message and not isinstance(exc, ChannelClosedError):
                self._receive_broken = "unusable after an interrupted or malformed message"
            raise
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return ReceivedMessage(framed=bytes(framed), passed=passed)

    async def _recv_into(self, view: memoryview) -> tuple[int, list[int]]:
        """One ``recvmsg_into`` of at most ``len(view)`` bytes: (bytes read, descriptors).

        Cancellation: safe while waiting (nothing read); returned descriptors are
        the caller's to close.
        """
        while True:
            try:
                got, ancdata, _flags, _addr = self._sock.recvmsg_into(
                    [view], RECV_ANCILLARY_BYTES, _RECV_FLAGS
                )
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable)
                continue
            except OSError as exc:
                raise self._os_error("receive", exc) from exc
            return got, fds_from_ancillary(ancdata)

    async def _recv_exactly(self, view: memoryview) -> None:
        """Fill ``view`` completely; a descriptor or EOF inside it is an error.

        Cancellation: may leave ``view`` partly filled; ``receive_message`` then
        marks the channel unusable for receiving.
        """
        filled = 0
        while filled < len(view):
            got, fds = await self._recv_into(view[filled:])
            if fds:
                for fd in fds:
                    close_fd_quietly(fd)
                raise ChannelProtocolError("a descriptor arrived in the middle of a message")
            if got == 0:
                raise ChannelClosedError("the peer closed the control channel mid-message")
            filled += got

    # -- shared --------------------------------------------------------------------

    async def _wait(self, waiter: Callable[[socket.socket], Awaitable[None]]) -> None:
        """Wait for readiness; a concurrent ``aclose`` becomes ``ChannelClosedError``.

        Cancellation: safe (only waits).
        """
        try:
            await waiter(self._sock)
        except trio.ClosedResourceError as exc:
            raise ChannelClosedError("the control channel was closed") from exc

    def _os_error(self, what: str, exc: OSError) -> TransportError:
        """The typed error for a failed send/recv."""
        if self._closed or exc.errno == errno.EBADF:
            return ChannelClosedError("the control channel was closed")
        if exc.errno in _PEER_GONE_ERRNOS:
            return ChannelClosedError(f"the peer is gone ({what}: {exc.strerror})")
        return TransportError(f"control channel {what} failed: {exc}")

    async def aclose(self) -> None:
        """Close the channel; waiting senders and receivers get ``ChannelClosedError``.

        Idempotent. Cancellation: the channel is closed even if the call is cancelled.
        """
        if not self._closed:
            self._closed = True
            close_socket_quietly(self._sock)
        await trio.lowlevel.checkpoint()


def _check_frame(framed: bytes) -> None:
    """Raise ``ValueError`` unless ``framed`` is exactly one v1 frame."""
    if len(framed) < FRAME_HEADER_BYTES:
        raise ValueError(f"a frame is at least {FRAME_HEADER_BYTES} bytes")
    framing, length = _HEADER.unpack_from(framed)
    if framing != FRAMING_BYTE:
        raise ValueError(f"bad framing byte 0x{framing:02x}")
    if length != len(framed) - FRAME_HEADER_BYTES:
        raise ValueError(
            f"frame header says {length} body bytes but {len(framed) - FRAME_HEADER_BYTES} follow"
        )


class UnixChildControl:
    """The child's end of a control socketpair, held by the parent until the spawn."""

    def __init__(self, sock: socket.socket, channel: UnixControlChannel) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._channel = channel

    def __repr__(self) -> str:
        state = "closed" if self._sock.fileno() < 0 else f"fd={self._fd}"
        return f"<UnixChildControl {state}>"

    @property
    def env(self) -> Mapping[str, str]:
        """The entry naming the inherited descriptor: ``{CONTROL_CHANNEL_ENV: "fd:<n>"}``."""
        return {CONTROL_CHANNEL_ENV: f"fd:{self._fd}"}

    @property
    def channel(self) -> UnixControlChannel:
        """The parent's end of the same pair."""
        return self._channel

    def fileno(self) -> int:
        """The descriptor to pass to the child; ``ValueError`` once closed."""
        fd = self._sock.fileno()
        if fd < 0:
            raise ValueError("this child control end was already used or closed")
        return fd

    def close(self) -> None:
        """Close the parent's copy of the child's end. Idempotent."""
        self._sock.close()


def open_control_pair() -> tuple[UnixControlChannel, UnixChildControl]:
    """Create a control socketpair: the broker's channel and the end a child will inherit.

    Both descriptors are close-on-exec in the parent; ``spawn_child`` hands the
    child's end to exactly one child (``pass_fds``), so no other process started
    meanwhile inherits it. ``ChildControl.env`` names it as ``fd:<n>``.
    """
    parent_end, child_end = (
        socket.socket(fileno=above_stdio(end.detach()))
        for end in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    )
    channel = UnixControlChannel(parent_end, peer_pid=0)
    return channel, UnixChildControl(child_end, channel)


async def open_inherited_control_channel(
    environ: Mapping[str, str] | None = None,
) -> UnixControlChannel:
    """Adopt the control channel this process inherited from ``spawn_child``.

    Reads ``CONTROL_CHANNEL_ENV`` (``fd:<n>``) from ``environ`` (default
    ``os.environ``), checks that the descriptor is an open ``AF_UNIX`` stream
    socket, and makes it close-on-exec and nonblocking. When reading
    ``os.environ`` the variable is removed, so grandchildren do not inherit it.
    Raises ``TransportError`` naming the problem when the variable is missing or
    invalid; an invalid descriptor is left untouched.

    Cancellation: a cancelled call adopts nothing and leaves the environment as it was.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    source: Mapping[str, str] = os.environ if environ is None else environ
    value = source.get(CONTROL_CHANNEL_ENV)
    if value is None:
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV} is not set: this process was not started by rpbroker"
        )
    match = _ENV_VALUE.fullmatch(value)
    if match is None:
        raise TransportError(f"{CONTROL_CHANNEL_ENV}={value!r} is not of the form fd:<n>")
    fd = int(match.group(1))
    if fd < MIN_NON_STDIO_FD:  # 0-2 are stdio, never ours
        raise TransportError(f"{CONTROL_CHANNEL_ENV} names fd {fd}, a standard stream")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV} names fd {fd}, which is not open: {exc.strerror}"
        ) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{CONTROL_CHANNEL_ENV} names fd {fd}, which is not a socket")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV} names fd {fd}, which cannot be used as a socket: {exc}"
        ) from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV} names fd {fd}, which is not an AF_UNIX stream socket"
        )
    sock.set_inheritable(False)
    try:
        peer_pid = socket_peer_identity(sock).pid
    except TransportError:
        peer_pid = 0
    channel = UnixControlChannel(sock, peer_pid=peer_pid)
    if environ is None:
        os.environ.pop(CONTROL_CHANNEL_ENV, None)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return channel
