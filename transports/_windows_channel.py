"""The broker-to-backend control channel on Windows: a private pipe, inherited by the child.

What this module does: ``create_control_pair`` makes a one-instance named pipe with
a random name (``rpb-v1-<userhash>-ctl-<32 hex>``) and the current-user-only
descriptor, opens its client end at once in the broker (so nobody else can
connect: the single instance is taken), and prepares that client handle to be
*inherited* by the backend through ``STARTUPINFO``'s handle list; the child finds
it through ``RPBROKER_CONTROL_CHANNEL=handle:<n>``. ``PipeControlChannel``
implements ``transports.ControlChannel`` over either end: v1 frames out (sends
serialized by a lock), v1 frames in (``FrameReader`` waits for the 5-byte header,
checks the framing byte and the length against the caller's cap, then waits for
exactly that many body bytes; it reads in chunks and keeps any bytes beyond the
frame for the next call, since nothing else reads this pipe), connection passing
through ``_windows_passing`` (DuplicateHandle into the peer pid), and adoption of
a handle value from an offer.

Why inheritance rather than letting the child connect by name: there is no window
in which another process could connect first, the peer needs no pid check, and
the broker learns the peer pid from the spawn itself. The client end is never
registered with the broker's completion port (a file object can be attached to
one port only, and it is the child's to attach).

What it does not do: parse frame bodies (they are opaque protobuf), or pass
connections inside the channel: ``ReceivedMessage.passed`` is always ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping

import trio

from transports._interface import (
    CONTROL_CHANNEL_ENV,
    FRAME_HEADER_BYTES,
    FRAMING_BYTE,
    ChannelClosedError,
    ChannelProtocolError,
    ConnectionPassError,
    PassedConnection,
    PassFailure,
    PassReceipt,
    ReceivedMessage,
    TransportError,
)
from transports._windows_api import (
    ERROR_IO_PENDING,
    ERROR_PIPE_CONNECTED,
    OPEN_EXISTING,
    OVERLAPPED,
    OverlappedIo,
    Win32Api,
    Win32Error,
)
from transports._windows_names import random_pipe_path
from transports._windows_passing import adopt_pipe_handle, check_token, duplicate_into_process
from transports._windows_pipes import CLIENT_ACCESS, CLIENT_FLAGS, create_pipe_instance
from transports._windows_stream import PipeStream

logger = logging.getLogger(__name__)

#: Value prefix of ``RPBROKER_CONTROL_CHANNEL`` for an inherited handle.
HANDLE_ENV_PREFIX = "handle:"

#: Bytes asked of the pipe per read while a frame is incomplete (one pipe buffer).
READ_CHUNK_BYTES = 65536

#: Upper bound of a single read, so a 16 MiB frame is read in pieces (bytes).
MAX_READ_BYTES = 1 << 20

#: OVERLAPPED structures whose I/O could not be confirmed finished; kept alive
#: forever because the kernel may still write to them (only on a "cannot happen"
#: path of ``create_control_pair``).
_ABANDONED_OVERLAPPED: list[OVERLAPPED] = []

_LENGTH = struct.Struct("<I")


def frame_header(length: int) -> bytes:
    """The 5-byte v1 header of a body of ``length`` bytes."""
    return bytes((FRAMING_BYTE,)) + _LENGTH.pack(length)


class FrameReader:
    """Splits a byte stream into v1 frames (0x01, u32 LE body length, body).

    ``receive_some(n)`` returns up to ``n`` bytes, ``b""`` at end-of-stream. Bytes
    are buffered here and consumed only when a whole frame is present, so a
    cancelled ``read_frame`` loses nothing and the next call resumes the same frame.
    """

    def __init__(self, receive_some: Callable[[int], Awaitable[bytes | bytearray]]) -> None:
        self._receive_some = receive_some
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buffer)

    async def _fill(self, needed: int) -> None:
        while len(self._buffer) < needed:
            want = min(max(READ_CHUNK_BYTES, needed - len(self._buffer)), MAX_READ_BYTES)
            chunk = await self._receive_some(want)
            if not chunk:
                if self._buffer:
                    raise ChannelClosedError(
                        f"the peer closed the channel in the middle of a frame "
                        f"({len(self._buffer)} bytes of it received)"
                    )
                raise ChannelClosedError("the peer closed the channel")
            self._buffer += chunk

    async def read_frame(self, max_body: int) -> bytes:
        """Return the next whole frame (header and body).

        Raises ``ChannelProtocolError`` for a framing byte other than 0x01 or a body
        longer than ``max_body`` (checked from the header, before the body is read)
        and ``ChannelClosedError`` at end-of-stream. Cancellation: safe at any
        point; partial data stays buffered for the next call.
        """
        await self._fill(FRAME_HEADER_BYTES)
        if self._buffer[0] != FRAMING_BYTE:
            raise ChannelProtocolError(
                f"bad framing byte {self._buffer[0]:#04x} (expected {FRAMING_BYTE:#04x})"
            )
        (length,) = _LENGTH.unpack_from(self._buffer, 1)
        if length > max_body:
            raise ChannelProtocolError(f"frame body of {length} bytes exceeds {max_body}")
        total = FRAME_HEADER_BYTES + length
        await self._fill(total)
        frame = bytes(self._buffer[:total])
        del self._buffer[:total]
        return frame


def check_frame(framed: bytes) -> None:
    """Raise ``ValueError`` unless ``framed`` is exactly one well-formed v1 frame."""
    if len(framed) < FRAME_HEADER_BYTES or framed[0] != FRAMING_BYTE:
        raise ValueError("not a v1 frame (missing or bad header)")
    (length,) = _LENGTH.unpack_from(framed, 1)
    if length != len(framed) - FRAME_HEADER_BYTES:
        raise ValueError(
            f"frame header says {length} body bytes, got {len(framed) - FRAME_HEADER_BYTES}"
        )


class PipeControlChannel:
    """``transports.ControlChannel`` over one end of a connected pipe.

    ``peer_pid`` is the process at the other end: the spawned child for the
    broker's end (set by ``spawn_child``; 0 before), the broker for the child's end.
    ``leaked_handles`` lists duplicates that reached the peer but whose offer was
    never sent because the send was cancelled (they leak until the peer exits).
    """

    def __init__(
        self, api: Win32Api, io: OverlappedIo, stream: PipeStream, *, peer_pid: int
    ) -> None:
        self._api = api
        self._io = io
        self._stream = stream
        self._peer_pid = peer_pid
        self._reader = FrameReader(self._receive_some)
        self._send_lock = trio.Lock()
        self._send_broken = False
        self.leaked_handles: list[int] = []

    def __repr__(self) -> str:
        return f"<PipeControlChannel peer_pid={self._peer_pid} {self._stream!r}>"

    @property
    def peer_pid(self) -> int:
        """The pid of the process at the other end (0 while unknown)."""
        return self._peer_pid

    def set_peer_pid(self, pid: int) -> None:
        """Record the pid of the spawned child (called by ``spawn_child``)."""
        self._peer_pid = pid

    @property
    def stream(self) -> PipeStream:
        return self._stream

    async def _receive_some(self, max_bytes: int) -> bytes | bytearray:
        try:
            return await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise ChannelClosedError(f"the control channel broke: {exc}") from exc

    async def send_message(self, framed: bytes) -> None:
        """Send one complete v1 frame; senders are serialized by a lock.

        Raises ``ChannelClosedError`` if the peer is gone. Cancellation: a send
        cancelled while writing may have written part of the frame, so the
        channel refuses further sends (``ChannelClosedError``) rather than risk a
        torn frame; a send cancelled while waiting for the lock has no effect.
        """
        check_frame(framed)
        async with self._send_lock:
            if self._send_broken:
                raise ChannelClosedError("an earlier send on this channel was interrupted")
            try:
                await self._stream.send_all(framed)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._send_broken = True
                raise ChannelClosedError(f"the control channel is closed: {exc}") from exc
            except BaseException:
                self._send_broken = True
                raise

    async def pass_connection(self, connection: trio.abc.Stream, token: bytes) -> PassReceipt:
        """Duplicate ``connection``'s handle into the peer process (facts §3.7).

        ``connection`` must be a ``PipeStream``; the caller keeps it and must close
        it. Nothing is written to the channel: the caller sends the offer carrying
        ``receipt.handle_value`` (or use ``pass_connection_then_send``). Raises
        ``ConnectionPassError``. Cancellation: only the initial checkpoint can be
        cancelled, before anything is duplicated.
        """
        await trio.lowlevel.checkpoint()
        check_token(token)
        if not isinstance(connection, PipeStream):
            raise ConnectionPassError(
                PassFailure.FAILED,
                f"only named-pipe streams can be passed, not {type(connection).__name__}",
            )
        try:
            source = connection.handle
        except trio.ClosedResourceError as exc:
            raise ConnectionPassError(PassFailure.FAILED, "the connection is closed") from exc
        return duplicate_into_process(self._api, source, self._peer_pid)

    async def pass_connection_then_send(
        self,
        connection: trio.abc.Stream,
        token: bytes,
        build_framed: Callable[[PassReceipt], bytes],
        *,
        preface: bytes = b"",
    ) -> PassReceipt:
        """Write ``preface`` on the connection, duplicate it into the peer, send the offer.

        ``preface`` (the broker's reply to the client) goes out on the connection
        before it is duplicated, so it precedes anything the peer writes there; a
        failure to write it raises ``trio.BrokenResourceError`` and passes nothing.

        The offer needs the duplicated handle value, hence the callable. If the
        duplication succeeded and anything afterwards fails, the error is a
        ``ConnectionPassError`` with ``fd_may_have_reached_backend=True`` and
        ``leaked_handle`` = the duplicate (the peer holds it; we cannot close it).
        Once the offer is sent, ``connection`` refuses further reads and writes
        (``PipeStream.mark_handed_off``): the peer may detach the shared file object
        from our completion port at any moment. The caller still closes it.

        Cancellation: before the duplication nothing happens; after it, the
        duplicate is recorded in ``leaked_handles`` and ``Cancelled`` propagates
        (and the channel refuses further sends if the frame was being written).
        """
        if preface:
            await connection.send_all(preface)
        receipt = await self.pass_connection(connection, token)
        leaked = receipt.duplicated_handle
        try:
            framed = build_framed(receipt)
            await self.send_message(framed)
        except ChannelClosedError as exc:
            raise ConnectionPassError(
                PassFailure.BACKEND_UNAVAILABLE,
                f"sending the offer failed after the duplication: {exc}",
                fd_may_have_reached_backend=True,
                leaked_handle=leaked,
            ) from exc
        except Exception as exc:
            raise ConnectionPassError(
                PassFailure.FAILED,
                f"building or sending the offer failed after the duplication: {exc!r}",
                fd_may_have_reached_backend=True,
                leaked_handle=leaked,
            ) from exc
        except BaseException:
            if leaked is not None:
                self.leaked_handles.append(leaked)
            raise
        if isinstance(connection, PipeStream):
            # The peer has the offer and may adopt (and detach) the file object now.
            connection.mark_handed_off()
        return receipt

    async def receive_message(self, max_body: int) -> ReceivedMessage:
        """Receive the next v1 frame (body at most ``max_body`` bytes).

        Raises ``ChannelClosedError`` at end-of-stream or when the pipe breaks and
        ``ChannelProtocolError`` for a bad framing byte or an oversize length.
        Cancellation: partial frames stay buffered, so a cancelled receive loses
        nothing (callers may still treat it as the end of the channel).
        """
        framed = await self._reader.read_frame(max_body)
        return ReceivedMessage(framed=framed, passed=None)

    def adopt_handle_value(self, handle_value: int, token: bytes) -> PassedConnection | None:
        """Wrap the handle named by a ``HandoffOffer`` as a stream (see ``adopt_pipe_handle``)."""
        return adopt_pipe_handle(self._api, self._io, handle_value, token)

    async def aclose(self) -> None:
        """Close our end (idempotent). Cancellation: closed even if cancelled."""
        await self._stream.aclose()


class PipeChildControl:
    """``transports.ChildControl``: the client end of a control pipe, for one child.

    ``handle`` must be inherited by exactly one child (``spawn_child`` puts it in
    the STARTUPINFO handle list and then calls ``close``).
    """

    def __init__(self, api: Win32Api, handle: int, parent: PipeControlChannel) -> None:
        self._api = api
        self._handle = handle
        self._parent = parent
        self._closed = False

    @property
    def env(self) -> Mapping[str, str]:
        return {CONTROL_CHANNEL_ENV: f"{HANDLE_ENV_PREFIX}{self._handle}"}

    @property
    def handle(self) -> int:
        if self._closed:
            raise TransportError("this child control handle was already closed")
        return self._handle

    @property
    def parent(self) -> PipeControlChannel:
        return self._parent

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the broker's copy of the child's end (idempotent)."""
        if not self._closed:
            self._closed = True
            self._api.close_handle_quietly(self._handle)


def create_control_pair(
    api: Win32Api, io: OverlappedIo, user_hash: str, sid: str
) -> tuple[PipeControlChannel, PipeChildControl]:
    """Create the broker's channel and the child's end of a new control pipe.

    Steps: CreateNamedPipeW(random name, FIRST_PIPE_INSTANCE, one instance,
    current-user-only); CreateFileW on it (overlapped, identification only);
    ConnectNamedPipe, which must report ERROR_PIPE_CONNECTED (our own client is
    the only one that can be there). The server end is registered with trio's
    completion port; the client end is not (the child will register it). Raises
    ``TransportError``; nothing is left open on failure.
    """
    path = random_pipe_path(user_hash, "ctl")
    server = create_pipe_instance(api, path, sid, first=True, max_instances=1)
    try:
        client = api.create_file(path, CLIENT_ACCESS, 0, OPEN_EXISTING, CLIENT_FLAGS)
    except Win32Error as exc:
        api.close_handle_quietly(server)
        raise TransportError(f"{path}: cannot open the control pipe's client end: {exc}") from exc
    try:
        _expect_connected(api, server, path)
        stream = PipeStream(api, io, server, server_end=True)
    except BaseException:
        api.close_handle_quietly(client)
        api.close_handle_quietly(server)
        raise
    channel = PipeControlChannel(api, io, stream, peer_pid=0)
    return channel, PipeChildControl(api, client, channel)


def _expect_connected(api: Win32Api, server: int, path: str) -> None:
    overlapped = OVERLAPPED()
    try:
        api.connect_named_pipe(server, overlapped)
    except Win32Error as exc:
        if exc.code == ERROR_PIPE_CONNECTED:
            return
        if exc.code == ERROR_IO_PENDING:
            # Not connected after all; cancel and keep the OVERLAPPED alive, since
            # the handle is not on a completion port we could wait on.
            _ABANDONED_OVERLAPPED.append(overlapped)
            with contextlib.suppress(Win32Error):
                api.cancel_io_ex(server, overlapped)
        raise TransportError(f"{path}: the control pipe did not connect: {exc}") from exc
    # Nonzero return: the handle is not on a completion port, so no packet matters.


async def open_inherited_channel(
    api: Win32Api, io: OverlappedIo, environ: Mapping[str, str]
) -> PipeControlChannel:
    """The child's side: wrap the handle named by ``RPBROKER_CONTROL_CHANNEL=handle:<n>``.

    The handle is made non-inheritable (so our own children do not get it),
    registered with trio's completion port, and the broker's pid is read from the
    pipe (GetNamedPipeServerProcessId). Raises ``TransportError`` for a missing or
    malformed variable or a handle that is not a pipe.

    Cancellation: a single checkpoint at the end; nothing to undo.
    """
    value = environ.get(CONTROL_CHANNEL_ENV)
    if not value:
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV} is not set: this process was not spawned by an rpbroker broker"
        )
    if not value.startswith(HANDLE_ENV_PREFIX) or not value[len(HANDLE_ENV_PREFIX) :].isdigit():
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV}={value[:80]!r} is not of the form {HANDLE_ENV_PREFIX}<n>"
        )
    handle = int(value[len(HANDLE_ENV_PREFIX) :])
    if handle <= 0:
        raise TransportError(f"{CONTROL_CHANNEL_ENV}={value!r} names no handle")
    try:
        api.set_handle_inheritable(handle, False)
        broker_pid = api.get_named_pipe_server_process_id(handle)
    except Win32Error as exc:
        raise TransportError(
            f"{CONTROL_CHANNEL_ENV}={value!r} is not an inherited pipe handle: {exc}"
        ) from exc
    try:
        stream = PipeStream(api, io, handle, server_end=False)
    except OSError as exc:
        raise TransportError(f"cannot register the control pipe with trio: {exc}") from exc
    await trio.lowlevel.checkpoint()
    return PipeControlChannel(api, io, stream, peer_pid=broker_pid)
