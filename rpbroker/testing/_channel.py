"""An in-memory ``transports.ControlChannel`` pair.

Both ends exchange whole v1 frames through trio memory channels. A passed
connection travels as a "token packet" that the receiver pairs with the next
frame, exactly like the Unix transport's ``SCM_RIGHTS`` packet: the receiver gets
a *duplicate* of the connection (``socket.dup()``), so the sender may close its
own copy as soon as the call returns.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import attrs
import trio

import transports
from transports import (
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
)

#: The pid a backend's end reports for its peer when no broker pid is given.
FAKE_BROKER_PID = os.getpid()


@attrs.frozen
class _TokenPacket:
    """A passed connection on its way; it belongs to the frame that follows it."""

    passed: PassedConnection


_Packet = _TokenPacket | bytes


def _check_frame(framed: bytes) -> None:
    """``ValueError`` unless ``framed`` is exactly one v1 frame (header + body)."""
    if len(framed) < FRAME_HEADER_BYTES or framed[0] != FRAMING_BYTE:
        raise ValueError("not a v1 frame: missing or wrong framing byte")
    length = int.from_bytes(framed[1:FRAME_HEADER_BYTES], "little")
    if length != len(framed) - FRAME_HEADER_BYTES:
        raise ValueError(
            f"not exactly one v1 frame: header says {length} body bytes, "
            f"got {len(framed) - FRAME_HEADER_BYTES}"
        )


def _check_token(token: bytes) -> None:
    if len(token) != HANDOFF_TOKEN_BYTES:
        raise ValueError(f"a handoff token is {HANDOFF_TOKEN_BYTES} bytes, got {len(token)}")


def _close_now(stream: trio.abc.Stream) -> None:
    """Close a passed stream synchronously (it is always a ``trio.SocketStream``)."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()


def _duplicate(connection: trio.abc.Stream) -> trio.SocketStream:
    """A new stream over a ``dup()`` of ``connection``'s socket."""
    if not isinstance(connection, trio.SocketStream):
        raise ConnectionPassError(
            PassFailure.FAILED,
            f"only a trio.SocketStream can be passed, got {type(connection).__name__}",
        )
    if connection.socket.fileno() < 0:
        raise ConnectionPassError(PassFailure.FAILED, "the connection is already closed")
    try:
        duplicate = connection.socket.dup()
    except OSError as exc:
        raise ConnectionPassError(
            PassFailure.FAILED, f"cannot duplicate the connection: {exc}", os_error=exc.errno
        ) from exc
    return trio.SocketStream(duplicate)


class MemoryControlChannel:
    """One end of an in-memory control channel (implements ``transports.ControlChannel``).

    Messages are buffered without bound, so a send never blocks. Errors are the
    transport's: ``ChannelClosedError`` once either end is closed,
    ``ChannelProtocolError`` for a frame over ``max_body``, ``ConnectionPassError``
    from the passing methods.

    Test hooks: set ``fail_next_pass`` to an exception and the next
    ``pass_connection``/``pass_connection_then_send`` raises it (after writing
    the preface), passing nothing. ``on_send`` is called with every frame this
    end sends, synchronously, just before the peer can see it. ``frames_sent``
    and ``connections_passed`` count what this end sent.
    """

    def __init__(
        self,
        send: trio.MemorySendChannel[_Packet],
        receive: trio.MemoryReceiveChannel[_Packet],
        *,
        peer_pid: int,
        name: str,
    ) -> None:
        self._send = send
        self._receive = receive
        self._peer_pid = peer_pid
        self._name = name
        self._closed = False
        self._receiving = False
        self._stashed: PassedConnection | None = None
        self.fail_next_pass: BaseException | None = None
        self.on_send: Callable[[bytes], None] | None = None
        self.frames_sent = 0
        self.connections_passed = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoryControlChannel {self._name} {state} peer_pid={self._peer_pid}>"

    @property
    def peer_pid(self) -> int:
        """The (fake) pid of the process at the other end."""
        return self._peer_pid

    @property
    def closed(self) -> bool:
        """True once this end was closed with ``aclose``."""
        return self._closed

    def bind_peer_pid(self, pid: int) -> None:
        """Set the pid this end reports for its peer."""
        self._peer_pid = pid

    def adopt_handle_value(self, handle_value: int, token: bytes) -> PassedConnection | None:
        """Always ``None``: connections arrive with ``receive_message`` (as on Unix)."""
        return None

    # -- sending ------------------------------------------------------------------

    def _put(self, *packets: _Packet) -> None:
        """Queue ``packets`` back to back (no other sender can come in between)."""
        if self._closed:
            raise ChannelClosedError("the control channel is closed")
        try:
            for packet in packets:
                self._send.send_nowait(packet)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosedError("the peer closed the control channel") from exc

    async def send_message(self, framed: bytes) -> None:
        """Send one complete v1 frame.

        Raises ``ValueError`` for anything that is not exactly one frame and
        ``ChannelClosedError`` when either end is closed.

        Cancellation: a cancelled call sent nothing; once queued, the frame is sent.
        """
        _check_frame(framed)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.on_send is not None:
            self.on_send(framed)
        self._put(framed)
        self.frames_sent += 1
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def pass_connection(self, connection: trio.abc.Stream, token: bytes) -> PassReceipt:
        """Give the peer a duplicate of ``connection`` with ``token``.

        The duplicate is paired with the next frame sent on this end. The caller
        keeps (and must close) its own copy. Raises ``ValueError`` for a token that
        is not 16 bytes and ``ConnectionPassError`` otherwise.

        Cancellation: a cancelled call passed nothing and closed nothing of the
        caller's; once the duplicate is queued the call completes.
        """
        _check_token(token)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._take_injected_failure()
        duplicate = _duplicate(connection)
        try:
            self._put(_TokenPacket(PassedConnection(token, duplicate)))
        except ChannelClosedError as exc:
            _close_now(duplicate)
            raise ConnectionPassError(PassFailure.BACKEND_UNAVAILABLE, str(exc)) from exc
        self.connections_passed += 1
        await trio.lowlevel.cancel_shielded_checkpoint()
        return PassReceipt(handle_value=0, duplicated_handle=None)

    async def pass_connection_then_send(
        self,
        connection: trio.abc.Stream,
        token: bytes,
        build_framed: bytes | Callable[[PassReceipt], bytes],
        *,
        preface: bytes = b"",
    ) -> PassReceipt:
        """Write ``preface`` on ``connection``, pass a duplicate with ``token``, send a frame.

        The duplicate and the frame are queued back to back, so the receiver gets
        them together in one ``ReceivedMessage``. ``build_framed`` is the frame or
        a function building it from the receipt. Raises ``ValueError`` for a bad
        token, ``trio.BrokenResourceError`` if the preface cannot be written
        (nothing passed) and ``ConnectionPassError`` for any later failure
        (nothing passed either: the duplicate is closed).

        Cancellation: a cancellation while the preface is written passes nothing;
        once the duplicate is queued the call completes.
        """
        _check_token(token)
        if isinstance(build_framed, bytes):
            _check_frame(build_framed)
        await trio.lowlevel.checkpoint_if_cancelled()
        if preface:
            await connection.send_all(preface)
        self._take_injected_failure()
        receipt = PassReceipt(handle_value=0, duplicated_handle=None)
        frame = build_framed if isinstance(build_framed, bytes) else build_framed(receipt)
        try:
            _check_frame(frame)
        except ValueError as exc:
            raise ConnectionPassError(
                PassFailure.FAILED, f"the offer frame is malformed: {exc}"
            ) from exc
        duplicate = _duplicate(connection)
        if self.on_send is not None:
            self.on_send(frame)
        try:
            self._put(_TokenPacket(PassedConnection(token, duplicate)), frame)
        except ChannelClosedError as exc:
            _close_now(duplicate)
            raise ConnectionPassError(PassFailure.BACKEND_UNAVAILABLE, str(exc)) from exc
        self.connections_passed += 1
        self.frames_sent += 1
        await trio.lowlevel.cancel_shielded_checkpoint()
        return receipt

    def _take_injected_failure(self) -> None:
        failure, self.fail_next_pass = self.fail_next_pass, None
        if failure is not None:
            raise failure

    # -- receiving -------------------------------------------------------------------

    async def receive_message(self, max_body: int) -> ReceivedMessage:
        """Receive the next frame, with the connection passed right before it (if any).

        Raises ``ChannelClosedError`` once the peer (or this end) closed the
        channel and ``ChannelProtocolError`` for a body over ``max_body`` bytes.
        Only one task may receive at a time (``trio.BusyResourceError``).

        Cancellation: safe at any point; nothing is lost.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this control channel")
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise ChannelClosedError("the control channel is closed")
        self._receiving = True
        try:
            while True:
                try:
                    packet = await self._receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
                    self._drop_stashed()
                    raise ChannelClosedError("the peer closed the control channel") from exc
                if isinstance(packet, _TokenPacket):
                    # A second token packet before a frame replaces the first.
                    self._drop_stashed()
                    self._stashed = packet.passed
                    continue
                if len(packet) - FRAME_HEADER_BYTES > max_body:
                    self._drop_stashed()
                    raise ChannelProtocolError(
                        f"frame body of {len(packet) - FRAME_HEADER_BYTES} bytes exceeds {max_body}"
                    )
                passed, self._stashed = self._stashed, None
                return ReceivedMessage(framed=packet, passed=passed)
        finally:
            self._receiving = False

    def _drop_stashed(self) -> None:
        if self._stashed is not None:
            _close_now(self._stashed.stream)
            self._stashed = None

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close this end now (synchronous form of ``aclose``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._send.close()
        # Connections queued for us that nobody will receive must not leak.
        while True:
            try:
                packet = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(packet, _TokenPacket):
                _close_now(packet.passed.stream)
        self._receive.close()
        self._drop_stashed()

    async def aclose(self) -> None:
        """Close this end; the peer's receive raises ``ChannelClosedError``. Idempotent.

        Cancellation: the channel is closed even if the call is cancelled.
        """
        self.close()
        await trio.lowlevel.checkpoint()


def memory_control_pair(
    *, backend_pid: int = 0, broker_pid: int = FAKE_BROKER_PID
) -> tuple[MemoryControlChannel, MemoryControlChannel]:
    """Create a connected ``(broker_end, backend_end)`` pair of in-memory control channels.

    ``broker_end.peer_pid`` is ``backend_pid`` (the fake process) and
    ``backend_end.peer_pid`` is ``broker_pid``. Both ends satisfy
    ``transports.ControlChannel``.
    """
    to_backend_send, to_backend_receive = trio.open_memory_channel[_Packet](math.inf)
    to_broker_send, to_broker_receive = trio.open_memory_channel[_Packet](math.inf)
    broker_end = MemoryControlChannel(
        to_backend_send, to_broker_receive, peer_pid=backend_pid, name="broker-end"
    )
    backend_end = MemoryControlChannel(
        to_broker_send, to_backend_receive, peer_pid=broker_pid, name="backend-end"
    )
    return broker_end, backend_end


def _conforms(channel: MemoryControlChannel) -> transports.ControlChannel:
    """Static check that the class implements the protocol (mypy verifies this)."""
    return channel
