"""The broker's control link to one backend: the channel, its one reader, its correlations.

What this module does: :class:`BackendLink` owns the broker's end of a backend's
persistent control channel. Exactly one task reads it (:meth:`BackendLink.run`)
and turns every inbound message into one typed notification: readiness and
activity go to the link's :class:`LinkObserver`; handoff and broadcast replies go
to the request that is waiting for them, matched by correlation id. Requests
(:meth:`BackendLink.broadcast`, and a handoff's :meth:`BackendLink.expect_handoff`
plus :meth:`BackendLink.pass_connection`) are the only way other modules talk to
a backend, so nothing else ever touches the channel or the correlation tables.
When the channel closes, every waiting request learns it at once
(:class:`LinkClosedError`), and the observer is told once.

A reply is delivered synchronously in the reader's own step, through the
waiter's ``on_reply`` callback when it gave one: whoever must record a result
"the moment it is known" (the failed-handoff budget) does so before any other
task of the broker runs.

What it does not do: decide anything about what the messages mean (the
lifecycle, the handoff delivery and the fan-out do), or survive a closed
channel: a link is used for one backend incarnation and then discarded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, Generic, Protocol, TypeVar

import trio

import transports
from rpbroker import control
from rpbroker.policy.broadcast import BroadcastOperation

logger = logging.getLogger("rpbroker.link")

#: Largest control-channel frame body the broker accepts from a backend, bytes.
#: Control messages are small (a HandoffAck is under 100 bytes; a broadcast ACK's
#: detail is a short sentence); 64 KiB leaves room for long details while keeping
#: one misbehaving backend from making the broker allocate 16 MiB per frame.
CONTROL_FRAME_MAX_BYTES: Final[int] = 64 * 1024


class LinkClosedError(Exception):
    """The control link closed before the awaited reply arrived."""


class LinkObserver(Protocol):
    """Who hears about a link's unsolicited messages and its end."""

    def link_ready(self, notice: control.ReadyNotice) -> None: ...

    def link_activity(self, notice: control.ActivityNotice) -> None: ...

    def link_closed(self, reason: str) -> None: ...


R = TypeVar("R", control.HandoffReply, control.BroadcastReply)


class _Waiter(Generic[R]):
    """One request waiting for its reply (``None`` once the link closed first)."""

    __slots__ = ("_event", "on_reply", "reply")

    def __init__(self, on_reply: Callable[[R | None], None] | None = None) -> None:
        self._event = trio.Event()
        self.reply: R | None = None
        self.on_reply: Callable[[R | None], None] | None = on_reply

    def deliver(self, reply: R | None) -> None:
        if self._event.is_set():
            return
        self.reply = reply
        if self.on_reply is not None:
            self.on_reply(reply)
        self._event.set()

    @property
    def arrived(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> R | None:
        await self._event.wait()
        return self.reply


class HandoffReplySlot:
    """Where the reply to one handoff offer arrives (see :meth:`BackendLink.expect_handoff`)."""

    __slots__ = ("_waiter",)

    def __init__(self, waiter: _Waiter[control.HandoffReply]) -> None:
        self._waiter = waiter

    @property
    def arrived(self) -> bool:
        """True once the reply (or the link's end) arrived."""
        return self._waiter.arrived

    async def wait(self) -> control.HandoffReply:
        """The backend's HandoffAck for this offer.

        Raises ``LinkClosedError`` if the link closes first. Cancellation: just
        stops waiting; the slot stays registered until its ``with`` block ends.
        """
        reply = await self._waiter.wait()
        if reply is None:
            raise LinkClosedError("the backend's control link closed before it acknowledged")
        return reply


class BackendLink:
    """The broker's end of one backend's control channel (one incarnation).

    ``run`` must be running (exactly once) for replies and notifications to
    arrive. All methods run in the broker's trio thread.
    """

    def __init__(self, channel: transports.ControlChannel, observer: LinkObserver) -> None:
        self._channel = channel
        self._observer = observer
        self._handoffs: dict[int, _Waiter[control.HandoffReply]] = {}
        self._broadcasts: dict[int, _Waiter[control.BroadcastReply]] = {}
        self._operation_ids = itertools.count(1)
        self._closed = False
        self._close_reason = ""

    @property
    def closed(self) -> bool:
        """True once the channel closed (or the reader ended)."""
        return self._closed

    @property
    def channel(self) -> transports.ControlChannel:
        """The underlying channel (for diagnostics and the testing kit only)."""
        return self._channel

    @property
    def pending_requests(self) -> int:
        """Requests waiting for a reply (for status and tests)."""
        return len(self._handoffs) + len(self._broadcasts)

    # -- reading ----------------------------------------------------------------------

    async def run(self) -> None:
        """Read the channel until it closes, dispatching every message.

        Returns once the channel is closed or unusable; every waiting request is
        then failed and the observer's ``link_closed`` is called exactly once.

        Cancellation: ends the reading; the link counts as closed (a cancelled
        receive may have consumed part of a message) and everything waiting is
        failed, exactly as if the channel had closed.
        """
        reason = "the control channel closed"
        try:
            while True:
                message = await self._channel.receive_message(CONTROL_FRAME_MAX_BYTES)
                if message.passed is not None:
                    # Backends never pass connections to the broker.
                    await message.passed.stream.aclose()
                try:
                    inbound = control.parse(message.framed)
                except control.ControlMessageError as exc:
                    logger.warning(
                        "backend pid=%s sent a bad control message: %s", self._channel.peer_pid, exc
                    )
                    continue
                self._dispatch(inbound)
        except transports.ChannelClosedError as exc:
            reason = f"the control channel closed: {exc}"
        except transports.ChannelProtocolError as exc:
            reason = f"the control channel broke: {exc}"
        except transports.TransportError as exc:
            reason = f"the control channel failed: {exc}"
        finally:
            self._close(reason)

    def _dispatch(self, inbound: control.Inbound) -> None:
        if isinstance(inbound, control.HandoffReply):
            handoff = self._handoffs.pop(inbound.correlation_id, None)
            if handoff is None:
                logger.info("late or unknown HandoffAck correlation_id=%d", inbound.correlation_id)
            else:
                handoff.deliver(inbound)
        elif isinstance(inbound, control.BroadcastReply):
            broadcast = self._broadcasts.pop(inbound.operation_id, None)
            if broadcast is not None:
                broadcast.deliver(inbound)
        elif isinstance(inbound, control.ReadyNotice):
            self._observer.link_ready(inbound)
        elif isinstance(inbound, control.ActivityNotice):
            self._observer.link_activity(inbound)
        else:
            logger.warning("backend sent an unexpected %s", type(inbound).__name__)

    def _close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        handoffs, broadcasts = list(self._handoffs.values()), list(self._broadcasts.values())
        self._handoffs.clear()
        self._broadcasts.clear()
        for handoff in handoffs:
            handoff.deliver(None)
        for broadcast in broadcasts:
            broadcast.deliver(None)
        self._observer.link_closed(reason)

    # -- requests -----------------------------------------------------------------------

    @contextmanager
    def expect_handoff(
        self,
        correlation_id: int,
        on_reply: Callable[[control.HandoffReply | None], None] | None = None,
    ) -> Iterator[HandoffReplySlot]:
        """Register for the HandoffAck of ``correlation_id`` before the offer goes out.

        ``on_reply`` is called synchronously, in the reader's step, with the reply
        (or ``None`` when the link closes first). Leaving the block unregisters;
        a reply arriving later is logged and dropped. Raises ``LinkClosedError`` if
        the link is already closed.
        """
        if self._closed:
            raise LinkClosedError(self._close_reason)
        waiter: _Waiter[control.HandoffReply] = _Waiter(on_reply)
        self._handoffs[correlation_id] = waiter
        try:
            yield HandoffReplySlot(waiter)
        finally:
            if self._handoffs.get(correlation_id) is waiter:
                del self._handoffs[correlation_id]

    async def pass_connection(
        self,
        connection: trio.abc.Stream,
        token: bytes,
        build_offer: Callable[[transports.PassReceipt], bytes],
        *,
        preface: bytes,
    ) -> transports.PassReceipt:
        """Write ``preface`` on ``connection``, pass it with ``token``, then send its offer.

        See ``transports.ControlChannel.pass_connection_then_send`` for the
        errors. Cancellation: as that method (safe until the descriptor leaves).
        """
        return await self._channel.pass_connection_then_send(
            connection, token, build_offer, preface=preface
        )

    async def broadcast(
        self, operation: BroadcastOperation, *, drain_deadline_ms: int, ack_timeout_ms: int
    ) -> control.BroadcastReply:
        """Send one lifecycle command and wait for the backend's answer.

        Raises ``LinkClosedError`` when the link closes (or the send fails)
        before the answer. The caller bounds the wait (``trio.move_on_at``).

        Cancellation: abandons the wait; the correlation is removed and a late
        answer is ignored.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise LinkClosedError(self._close_reason)
        operation_id = next(self._operation_ids)
        waiter: _Waiter[control.BroadcastReply] = _Waiter()
        self._broadcasts[operation_id] = waiter
        try:
            try:
                await self._channel.send_message(
                    control.broadcast_command(
                        operation_id, operation, drain_deadline_ms, ack_timeout_ms
                    )
                )
            except transports.TransportError as exc:
                raise LinkClosedError(f"the command could not be sent: {exc}") from exc
            reply = await waiter.wait()
        finally:
            self._broadcasts.pop(operation_id, None)
        if reply is None:
            raise LinkClosedError(self._close_reason or "the control link closed")
        return reply

    async def aclose(self) -> None:
        """Close the channel (the reader then ends). Idempotent.

        Cancellation: the channel is closed even if cancelled.
        """
        await self._channel.aclose()
