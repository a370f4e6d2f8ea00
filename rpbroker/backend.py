"""Backend SDK: turn ``async def handle(stream)`` into a brokered service.

What this module does: run inside a process the broker spawned. It reads the
endpoint and control channel the broker provided, listens on the endpoint
(reconnect route), adopts connections the broker hands off over the control
channel (handoff route) after checking each offer (correlation id, token shape,
token sent with the descriptor, absolute deadline, one use per token), writes the
handoff-ready EVENT to the adopted client itself and only then acknowledges to the
broker, answers the ``0xB232`` endpoint probe, reports activity, answers lifecycle
broadcasts (release-handles calls a user hook; quiesce stops accepting, drains
within a bound and returns), and returns when the broker goes away.

What it does not do: speak the application protocol (that is the handler's job),
or restart itself. Every connection is served by the same handler whichever route
it came by; a handler's exception is logged and closes only that connection.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.errors import BackendEnvironmentError
from rpbroker.identity import local_identity
from rpbroker.launcher import ENV_ENDPOINT, ENV_INSTANCE, ENV_SERVICE_NAME, ENV_SERVICE_VERSION
from rpbroker.logfmt import configure_logging_from_env
from rpbroker.policy.broadcast import BroadcastFailure, Quiesce, ReleaseHandles
from rpbroker.policy.tokens import HANDOFF_TOKEN_BYTES, HandoffToken, TokenVerdict, parse_token
from rpbroker.streams import PrefixedStream
from rpbroker.wire import DaemonProcess, Endpoint, Frame
from rpbroker.wire.probe import (
    NotAProbe,
    ProbeRequestSeen,
    probe_reply_frame,
    sniff_probe_request,
)

logger = logging.getLogger("rpbroker.backend")


#: How long a quiesced backend lets live connections finish before cancelling them,
#: seconds, when the broker's command carries no drain deadline.
DEFAULT_DRAIN_TIMEOUT_S = 10.0
#: Bound on writing the handoff-ready EVENT to an adopted client, seconds. The
#: client's socket buffer is empty at that point, so this only trips for a peer
#: that is gone or hostile.
READY_WRITE_TIMEOUT_S = 1.0
#: Consumed tokens remembered to refuse a replayed offer. Tokens are 128-bit random
#: and expire at the broker after 30 s, so a bounded memory is enough.
CONSUMED_TOKEN_MEMORY = 4096
#: Longest an ACK waits for the backend to go idle before it is sent anyway, s.
#: Far below the broker's 5 s ACK deadline.
ACK_IDLE_WAIT_S = 0.05
#: Bound on a release-handles hook when the broker's command states no ACK timeout, s
#: (the broker's default ACK timeout: after it the broker has stopped listening).
HOOK_TIMEOUT_S = 5.0
#: How much earlier than the broker's drain deadline a quiescing backend cancels its
#: remaining connections and returns, s (at most a fifth of the drain): the broker
#: sends SIGTERM at its deadline, so a backend that ends its own work first exits
#: cleanly instead of being signalled.
DRAIN_EXIT_MARGIN_S = 0.25
#: Largest control frame the SDK accepts from the broker, bytes (an offer or a
#: broadcast command is well under 1 KiB).
MAX_CONTROL_FRAME_BYTES = 64 * 1024
#: Minimum spacing of activity reports to the broker, seconds. Idle timeouts are
#: tens of seconds, so a report a second is ample and costs nothing per connection.
ACTIVITY_REPORT_INTERVAL_S = 1.0

Handler = Callable[[trio.abc.Stream], Awaitable[None]]
ReleaseHook = Callable[[str], Awaitable[None]]


@attrs.frozen
class BackendContext:
    """What the broker told this backend through its environment."""

    service_name: str
    service_version: str
    endpoint: str
    instance: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> BackendContext:
        missing = [
            name
            for name in (ENV_ENDPOINT, ENV_SERVICE_NAME, ENV_SERVICE_VERSION)
            if not environ.get(name)
        ]
        if missing or not environ.get(transports.CONTROL_CHANNEL_ENV):
            missing.append(transports.CONTROL_CHANNEL_ENV)
            raise BackendEnvironmentError(
                "this process was not started by an rpbroker broker: missing "
                + ", ".join(sorted(set(missing)))
            )
        return cls(
            service_name=environ[ENV_SERVICE_NAME],
            service_version=environ[ENV_SERVICE_VERSION],
            endpoint=environ[ENV_ENDPOINT],
            instance=environ.get(ENV_INSTANCE, ""),
        )


class _ProbeAwareStream(PrefixedStream):
    """A reconnect-route stream that answers an endpoint probe instead of passing it on.

    The handler's first ``receive_some`` first looks at what the client sent
    (``wire.sniff_probe_request``): a complete v1 probe request (0xB232, 32-byte
    nonce, any request_id and trace context) is answered with this process's
    identity, echoing request_id and trace context as the reference does, and the
    connection is closed: the handler sees end-of-stream and its writes fail as to
    a peer that hung up. Anything else reaches the handler byte for byte, the
    sniffed bytes first. Reads are bounded by the shortest probe frame the bytes
    so far allow, so nothing after a probe is consumed. Once the first bytes look
    like the start of a probe, the rest must arrive within ``COMPLETION_WAIT_S``;
    after that they go to the handler as they are, so a client that sends a few
    probe-like bytes and waits for an answer is served, not stalled. Cancelling a
    ``receive_some`` during the sniff keeps what was read for the next call.

    A handler that writes before it first reads (a server-speaks-first protocol)
    writes ahead of any probe reply, so such backends cannot be probed.
    """

    #: How long the rest of a probe-looking start may take to arrive, seconds.
    #: Probers write a request in one piece (the reference's probe.rs and
    #: ``rpbroker.probe_client`` both do), so for them the rest is already queued
    #: and this never runs out. It bounds the delay of an application client whose
    #: first write happens to be a strict prefix of a probe frame, and gives a
    #: prober that splits its writes that long to finish.
    COMPLETION_WAIT_S: Final = 0.1
    #: Bound on writing the probe reply, seconds: a few hundred bytes into an
    #: empty socket buffer, so this only trips for a prober that stopped reading.
    REPLY_WRITE_TIMEOUT_S: Final = 1.0

    def __init__(self, inner: trio.abc.Stream, identity: Callable[[], DaemonProcess]) -> None:
        super().__init__(inner)
        self._identity = identity
        self._sniffing = True
        self._seen = bytearray()
        self._complete_by = math.inf
        self._probe: Frame | None = None
        self._answered = False

    async def _sniff(self) -> None:
        while True:
            verdict = sniff_probe_request(bytes(self._seen))
            if isinstance(verdict, ProbeRequestSeen):
                self._probe = verdict.frame
                break
            if isinstance(verdict, NotAProbe):
                break
            with trio.move_on_at(self._complete_by) as waited:
                chunk = await self._inner.receive_some(verdict.at_most)
            if waited.cancelled_caught or not chunk:
                break  # the rest did not come: these bytes are the client's
            if not self._seen:
                self._complete_by = trio.current_time() + self.COMPLETION_WAIT_S
            self._seen += chunk
        self._sniffing = False
        if self._probe is None:
            self._prefix = bytes(self._seen)
        self._seen = bytearray()

    async def _answer(self, request: Frame) -> None:
        self._answered = True
        try:
            reply = probe_reply_frame(request, self._identity())
            with trio.move_on_after(self.REPLY_WRITE_TIMEOUT_S):
                await self._inner.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the prober hung up first; it asked and left
        finally:
            with trio.CancelScope(shield=True):
                await self._inner.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._sniffing:
            await self._sniff()
        if self._probe is not None:
            request, self._probe = self._probe, None
            await self._answer(request)
        if self._answered:
            await trio.lowlevel.checkpoint()
            return b""  # a probe connection carries nothing for the handler
        return await super().receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._answered:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("this connection was an endpoint probe and is closed")
        await super().send_all(data)


class _Backend:
    def __init__(
        self,
        ctx: BackendContext,
        handler: Handler,
        channel: transports.ControlChannel,
        listener: transports.Listener,
        on_release_handles: ReleaseHook | None,
        drain_timeout_s: float,
    ) -> None:
        self.ctx = ctx
        self.handler = handler
        self.channel = channel
        self.listener = listener
        self.on_release_handles = on_release_handles
        self.drain_timeout_s = drain_timeout_s
        self.open_connections = 0
        self.completed_connections = 0
        self.started_at_ms = int(time.time() * 1000)
        self._consumed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: Passed connections handed to a handler (the offer task must not close them).
        self._adopted: set[trio.abc.Stream] = set()
        #: HandoffAcks waiting for the ACK sender (``_send_acks``).
        self._acks: list[bytes] = []
        self._acks_queued = trio.Event()
        self._activity = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._accept_scope = trio.CancelScope()
        self._handlers: trio.Nursery | None = None
        self._services: trio.Nursery | None = None

    # -- identity ---------------------------------------------------------------

    def identity(self) -> DaemonProcess:
        """This process's probe identity (``rpbroker.identity``; executable hashed once)."""
        return local_identity(
            Endpoint(namespace_id=self.ctx.instance, path=self.ctx.endpoint),
            started_at_unix_ms=self.started_at_ms,
        )

    # -- connections --------------------------------------------------------------

    def _start_handler(self, stream: trio.abc.Stream) -> None:
        assert self._handlers is not None
        self.open_connections += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._activity.set()
        self._handlers.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: trio.abc.Stream) -> None:
        try:
            async with stream:
                await self.handler(stream)
        except Exception:
            logger.exception("handler failed; closing this connection only")
        finally:
            self.open_connections -= 1
            self.completed_connections += 1
            if self.open_connections == 0:
                self._idle.set()
            self._activity.set()

    async def _accept_loop(self) -> None:
        with self._accept_scope:
            while True:
                try:
                    stream = await self.listener.accept()
                except transports.FdExhaustedError:
                    await trio.sleep(0.05)
                    continue
                self._start_handler(_ProbeAwareStream(stream, self.identity))

    async def _report_activity(self) -> None:
        """Tell the broker about connection activity, coalesced to one report per interval.

        The broker marks activity itself whenever it routes a client here; these
        reports only keep long-lived connections from looking idle, so they stay
        off every connection's critical path.
        """
        while True:
            await self._activity.wait()
            self._activity = trio.Event()
            await self.channel.send_message(
                control.activity_message(self.open_connections, self.completed_connections)
            )
            await trio.sleep(ACTIVITY_REPORT_INTERVAL_S)

    # -- control channel -------------------------------------------------------------

    async def _control_loop(self, done: trio.CancelScope) -> None:
        """Read the broker's commands; each offer and each broadcast runs in its own task.

        So a slow release hook or a quiesce drain never holds up a handoff.
        Cancellation: ends the loop; offers already received close their
        connection if they did not adopt it.
        """
        assert self._services is not None
        try:
            while True:
                message = await self.channel.receive_message(MAX_CONTROL_FRAME_BYTES)
                try:
                    inbound = control.parse(message.framed)
                except control.ControlMessageError as exc:
                    logger.warning("ignoring control message: %s", exc)
                    if message.passed is not None:
                        await message.passed.stream.aclose()
                    continue
                if isinstance(inbound, control.OfferNotice):
                    self._services.start_soon(self._offer_task, inbound, message.passed)
                elif isinstance(inbound, control.BroadcastNotice):
                    self._services.start_soon(self._on_broadcast, inbound, done)
                elif message.passed is not None:
                    await message.passed.stream.aclose()
        except (transports.ChannelClosedError, transports.ChannelProtocolError) as exc:
            logger.info("broker went away (%s); stopping", exc)
            done.cancel()

    async def _offer_task(
        self, notice: control.OfferNotice, passed: transports.PassedConnection | None
    ) -> None:
        """Run one offer; a connection it did not adopt is always closed.

        Cancellation: the unadopted connection is closed (shielded).
        """
        if passed is None:
            offer = notice.offer
            passed = self.channel.adopt_handle_value(offer.handle_value, bytes(offer.token))
        try:
            await self._on_offer(notice, passed)
        finally:
            if passed is not None and passed.stream not in self._adopted:
                with trio.CancelScope(shield=True):
                    await passed.stream.aclose()
            if passed is not None:
                self._adopted.discard(passed.stream)

    async def _on_offer(
        self, notice: control.OfferNotice, passed: transports.PassedConnection | None
    ) -> None:
        """Check one offer; adopt (EVENT to the client, serve, ACK when idle) or refuse.

        A refusal is acknowledged to the broker *before* the client is told, so
        the broker counts the failure before the client can come back to it.

        Cancellation: safe; ``_offer_task`` closes a connection left unadopted.
        """
        offer = notice.offer
        token_bytes = bytes(offer.token)
        detail = self._offer_problem(notice, passed)
        if detail is None and passed is not None:
            try:
                with trio.fail_after(READY_WRITE_TIMEOUT_S):
                    await passed.stream.send_all(
                        control.handoff_ready_event(
                            token=token_bytes,
                            accepted=True,
                            detail="",
                            correlation_id=offer.correlation_id,
                        )
                    )
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                detail = control.CLIENT_GONE_DETAIL
            else:
                self._remember(token_bytes)
                self._adopted.add(passed.stream)
                self._start_handler(passed.stream)
                # The ACK is off the client's critical path: the handler runs first
                # and the ACK sender sends it once this process is idle.
                self._queue_ack(
                    control.handoff_reply(
                        token=token_bytes,
                        accepted=True,
                        detail="",
                        correlation_id=offer.correlation_id,
                    )
                )
                return
        await self._refuse(notice, passed, detail or "refused")

    async def _refuse(
        self, notice: control.OfferNotice, passed: transports.PassedConnection | None, detail: str
    ) -> None:
        """Refuse an offer: ACK ``accepted=False`` to the broker, then tell the client.

        Cancellation: safe; the caller closes the connection.
        """
        offer = notice.offer
        token_bytes = bytes(offer.token)
        logger.info("refused handoff %d: %s", offer.correlation_id, detail)
        with contextlib.suppress(transports.ChannelClosedError):
            await self.channel.send_message(
                control.handoff_reply(
                    token=token_bytes,
                    accepted=False,
                    detail=detail,
                    correlation_id=offer.correlation_id,
                )
            )
        if passed is not None:
            # Tell the client: it falls back at once instead of at the deadline.
            with (
                trio.move_on_after(READY_WRITE_TIMEOUT_S),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await passed.stream.send_all(
                    control.handoff_ready_event(
                        token=token_bytes,
                        accepted=False,
                        detail=detail,
                        correlation_id=offer.correlation_id,
                    )
                )

    def _offer_problem(
        self, notice: control.OfferNotice, passed: transports.PassedConnection | None
    ) -> str | None:
        offer, frame = notice.offer, notice.frame
        if frame.request_id != offer.correlation_id:
            return "frame request_id does not match HandoffOffer correlation_id"
        parsed = parse_token(bytes(offer.token))
        if not isinstance(parsed, HandoffToken):
            return parsed.detail
        if passed is None:
            return "no connection arrived with the offer"
        if len(passed.token) != HANDOFF_TOKEN_BYTES or HandoffToken(passed.token) != parsed:
            return TokenVerdict.MISMATCH.detail()
        if bytes(offer.token) in self._consumed:
            return TokenVerdict.NOT_PENDING.detail()
        # The adoption deadline agreed with the broker and the client: never adopt
        # at or after it (the client may already have re-sent its request).
        if frame.deadline_unix_ms and time.time() * 1000 >= frame.deadline_unix_ms:
            return TokenVerdict.EXPIRED.detail()
        if offer.service_name and offer.service_name != self.ctx.service_name:
            return "offer names another service"
        return None

    def _queue_ack(self, framed: bytes) -> None:
        """Hand a HandoffAck to the ACK sender (it goes out once this process is idle)."""
        self._acks.append(framed)
        self._acks_queued.set()

    async def _send_acks(self) -> None:
        """Send queued HandoffAcks once no other task of this process is ready to run.

        One long-lived task rather than one per handoff: the adopted client's first
        exchange goes first, so the ACK (and the broker's work on receiving it)
        never competes with it for a CPU. Each wait is bounded by
        ``ACK_IDLE_WAIT_S``, so a busy backend still ACKs well inside the deadline.

        Cancellation: ends the loop; ACKs still queued are not sent (the broker's
        ACK deadline then decides, as for a backend that went away).
        """
        while True:
            await self._acks_queued.wait()
            self._acks_queued = trio.Event()
            give_up_at = trio.current_time() + ACK_IDLE_WAIT_S
            await trio.lowlevel.checkpoint()
            while (
                trio.lowlevel.current_statistics().tasks_runnable > 0
                and trio.current_time() < give_up_at
            ):
                await trio.lowlevel.checkpoint()
            acks, self._acks = self._acks, []
            for framed in acks:
                with contextlib.suppress(transports.ChannelClosedError):
                    await self.channel.send_message(framed)

    def _remember(self, token: bytes) -> None:
        self._consumed[token] = None
        while len(self._consumed) > CONSUMED_TOKEN_MEMORY:
            self._consumed.popitem(last=False)

    async def _on_broadcast(self, notice: control.BroadcastNotice, done: trio.CancelScope) -> None:
        """Answer one broadcast (its own task). Release hooks are bounded by the ACK timeout.

        Quiesce: ACK, stop accepting, let live connections finish until shortly
        before the broker's drain deadline (then cancel them), and end ``done``.

        Cancellation: abandons the command (no ACK).
        """
        op = notice.operation
        if isinstance(op, ReleaseHandles):
            failure: BroadcastFailure | None = None
            detail = ""
            if self.on_release_handles is not None:
                bound = notice.ack_timeout_ms / 1000 if notice.ack_timeout_ms else HOOK_TIMEOUT_S
                with trio.move_on_after(bound) as hook_scope:
                    try:
                        await self.on_release_handles(op.path_prefix)
                    except Exception as exc:
                        failure, detail = (
                            BroadcastFailure.BACKEND_ERROR,
                            f"release hook failed: {exc}",
                        )
                if hook_scope.cancelled_caught:
                    failure = BroadcastFailure.BACKEND_ERROR
                    detail = f"release hook did not finish within {bound:g} s"
            with contextlib.suppress(transports.ChannelClosedError):
                await self.channel.send_message(
                    control.broadcast_reply(notice.operation_id, failure, detail)
                )
            return
        assert isinstance(op, Quiesce)
        with contextlib.suppress(transports.ChannelClosedError):
            await self.channel.send_message(control.broadcast_reply(notice.operation_id, None))
        drain = (
            notice.drain_deadline_ms / 1000 if notice.drain_deadline_ms else self.drain_timeout_s
        )
        self._accept_scope.cancel()
        await self.listener.aclose()
        with trio.move_on_after(max(0.0, drain - min(DRAIN_EXIT_MARGIN_S, drain / 5))):
            await self._idle.wait()
        done.cancel()

    # -- lifecycle --------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[BackendContext]) -> None:
        done = trio.CancelScope()
        with done:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                async with trio.open_nursery() as services:
                    self._services = services
                    services.start_soon(self._accept_loop)
                    services.start_soon(self._report_activity)
                    services.start_soon(self._send_acks)
                    services.start_soon(self._control_loop, done)
                    await self.channel.send_message(
                        control.ready_message(
                            self.ctx.endpoint,
                            os.getpid(),
                            self.ctx.service_name,
                            self.ctx.service_version,
                        )
                    )
                    task_status.started(self.ctx)


async def serve_backend(
    handler: Handler,
    *,
    on_release_handles: ReleaseHook | None = None,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[BackendContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` as the backend the broker spawned this process for.

    Returns when the broker goes away, or after a quiesce broadcast once live
    connections have drained (at most ``drain_timeout_s`` unless the broker's command
    says otherwise). ``task_status.started`` reports the ``BackendContext`` once the
    endpoint listens and the broker has been told.

    Cancellation: cancelling it closes the listener, the control channel and every
    live connection; no descriptor or task is left behind.
    """
    env = os.environ if environ is None else environ
    ctx = BackendContext.from_environ(env)
    channel = await transports.open_inherited_control_channel(environ)
    try:
        listener = await transports.open_listener(ctx.endpoint)
        try:
            backend = _Backend(ctx, handler, channel, listener, on_release_handles, drain_timeout_s)
            await backend.run(task_status)
        finally:
            await listener.aclose()
    finally:
        await channel.aclose()


def run_backend(handler: Handler, **kwargs: Any) -> None:
    """Run ``serve_backend(handler, **kwargs)`` under ``trio.run`` (for backend scripts)."""
    configure_logging_from_env(
        logging.WARNING,
        static={"backend": os.environ.get(ENV_SERVICE_NAME), "backend_pid": os.getpid()},
    )
    trio.run(partial(serve_backend, handler, **kwargs))
