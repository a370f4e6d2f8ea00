"""Handoff orchestration: pass a client's connection to its backend, or fall back.

What this module does: the trio shell around the handoff policy. It decides
whether to attempt (fallback policy), issues and registers the one-time token,
and runs one attempt: send the connection and the token over the backend's
persistent control channel together with an offer that carries the absolute
adoption deadline, wait for the backend's HandoffAck under
``trio.move_on_after``, and complete it in the pending-ACK registry (which
re-checks the deadline). Any failure abandons the attempt (token revoked,
pending entry removed) and is reported as a typed fallback saying at which stage
it failed, why, and whether the connection may already have reached the backend.

What it does not do: write to the client after the connection has been passed
(the backend writes the handoff-ready EVENT itself, so two writers never
interleave), raise for transport, delivery or registry errors, or decide what the
client does next (it falls back to reconnect on its own).
"""

from __future__ import annotations

import enum
import time

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.backends import BackendHandle
from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog
from rpbroker.policy.ack import AckCompleted, AckRegistry
from rpbroker.policy.fallback import (
    Attempt,
    Fallback,
    FallbackPolicy,
    FallbackReason,
    FallbackState,
    HandoffInputs,
)
from rpbroker.policy.tokens import HandoffToken, TokenCollisionExhausted, TokenStore, TokenStoreFull


class HandoffStage(enum.Enum):
    """Where an attempt stopped."""

    SEND = "send"
    AWAIT_ACK = "await-ack"
    ACKNOWLEDGE = "acknowledge"


@attrs.frozen
class HandoffCompleted:
    """The backend adopted the connection and acknowledged within the deadline."""

    correlation_id: int
    waited_s: float


@attrs.frozen
class HandoffFellBack:
    """The attempt was abandoned; the client reconnects to ``backend_pipe``.

    ``fd_reached_backend``: the backend may hold a duplicate of the connection (it
    can never adopt it: the offer's deadline and the revoked token forbid it).
    ``leaked_handle``: on Windows, the duplicated handle left in the backend's table.
    ``backend_rejected``: the backend answered with an explicit refusal (it has then
    told the client itself).
    """

    stage: HandoffStage
    reason: FallbackReason
    detail: str
    fd_reached_backend: bool
    leaked_handle: int | None = None
    backend_rejected: bool = False


HandoffOutcome = HandoffCompleted | HandoffFellBack


class HandoffCoordinator:
    """Tokens, pending ACKs and the fallback state, with the attempt runner."""

    def __init__(self, config: BrokerConfig, events: EventLog) -> None:
        self._config = config
        self._events = events
        self.tokens = TokenStore()
        self.acks = AckRegistry(self.tokens, deadline_s=config.ack_deadline_s)
        self.fallback = FallbackState(FallbackPolicy())

    def decide(
        self, *, client_opted_in: bool, backend: BackendHandle, fd_pressure: bool, now: float
    ) -> Attempt | Fallback:
        inputs = HandoffInputs(
            client_opted_in=client_opted_in,
            service_allows=self._config.handoff_enabled and backend.spec.handoff,
            fd_pressure=fd_pressure,
            backend_adopted=backend.adopted,
        )
        return self.fallback.should_attempt(backend.key, inputs, now)

    def issue(self, backend: BackendHandle, now: float) -> HandoffToken | None:
        """Issue and register a token, or ``None`` (silent downgrade) if the store is full."""
        try:
            token = self.tokens.issue(now)
        except (TokenStoreFull, TokenCollisionExhausted):
            return None
        self.acks.register(token, backend.ref, now)
        return token

    async def attempt(
        self,
        client: trio.abc.Stream,
        backend: BackendHandle,
        token: HandoffToken,
        correlation_id: int,
        reply_frame: bytes,
    ) -> HandoffOutcome:
        """Reply to the client, then pass its connection to the backend and await the ACK.

        ``reply_frame`` (the framed Negotiated) is written on the connection by the
        transport immediately before the connection is passed, in the same
        scheduler slice when no buffer is full: nothing sits between the client
        getting its reply and the backend getting the connection. The caller keeps
        its copy of ``client`` and closes it afterwards in every case; if the
        outcome says the connection never reached the backend (and the reply was
        written), the caller may tell the client with a refusal EVENT first.

        Cancellation: the ACK wait runs in the attempt's own nursery under the
        registry's deadline; cancelling the attempt (broker shutting down) abandons
        it exactly like a failure: the token is revoked and the pending entry
        removed. Never raises for transport, delivery or registry errors.
        """
        outcome: HandoffOutcome | None = None
        try:
            outcome = await self._run(client, backend, token, correlation_id, reply_frame)
            return outcome
        finally:
            if not isinstance(outcome, HandoffCompleted):
                self.acks.abandon(token)
                self.fallback.record_failure(backend.key, trio.current_time())
                self._events.emit(
                    EventKind.HANDOFF_FALLBACK,
                    service_name=backend.key.service_name,
                    service_version=backend.key.service_version,
                    pid=backend.pid,
                    reason=outcome.detail if outcome is not None else "abandoned",
                    stage=outcome.stage.value if outcome is not None else "cancelled",
                    fd_reached_backend=outcome.fd_reached_backend if outcome else True,
                    correlation_id=correlation_id,
                )
            else:
                self.fallback.record_success(backend.key)
                self._events.emit(
                    EventKind.HANDOFF_COMPLETED,
                    service_name=backend.key.service_name,
                    service_version=backend.key.service_version,
                    pid=backend.pid,
                    correlation_id=correlation_id,
                    waited_ms=round(outcome.waited_s * 1000, 3),
                )

    async def _run(
        self,
        client: trio.abc.Stream,
        backend: BackendHandle,
        token: HandoffToken,
        correlation_id: int,
        reply_frame: bytes,
    ) -> HandoffOutcome:
        channel = backend.channel
        deadline = self.acks.deadline_of(token)
        if channel is None or deadline is None or not backend.alive:
            return HandoffFellBack(
                HandoffStage.SEND,
                FallbackReason.BACKEND_ACK_TIMEOUT,
                "backend is not available for a handoff",
                fd_reached_backend=False,
            )
        adopt_by_ms = int((time.time() + self._config.handoff_adopt_window_s) * 1000)
        send, receive = trio.open_memory_channel[control.HandoffReply](1)
        backend.handoff_waiters[correlation_id] = send
        receipt: transports.PassReceipt | None = None
        reply: control.HandoffReply | None = None
        try:
            # One deadline (the registry's) bounds the pass and the ACK wait alike.
            with trio.CancelScope(deadline=deadline):
                passed = await self._pass(
                    channel, client, token, correlation_id, reply_frame, backend, adopt_by_ms
                )
                if isinstance(passed, HandoffFellBack):
                    return passed
                receipt = passed
                # The attempt's own nursery, around the wait for the backend's ACK.
                async with trio.open_nursery():
                    try:
                        reply = await receive.receive()
                    except trio.EndOfChannel:
                        return HandoffFellBack(
                            HandoffStage.AWAIT_ACK,
                            FallbackReason.BACKEND_ACK_TIMEOUT,
                            "backend went away before acknowledging",
                            fd_reached_backend=True,
                            leaked_handle=receipt.duplicated_handle,
                        )
            if receipt is None:
                return HandoffFellBack(
                    HandoffStage.SEND,
                    FallbackReason.BACKEND_ACK_TIMEOUT,
                    "the reply or the connection could not be sent before the deadline",
                    # Conservative: the reply may be half written, so nobody may
                    # write to this connection any more.
                    fd_reached_backend=True,
                )
            leaked = receipt.duplicated_handle
            if reply is None:
                return HandoffFellBack(
                    HandoffStage.AWAIT_ACK,
                    FallbackReason.BACKEND_ACK_TIMEOUT,
                    "no HandoffAck before the deadline",
                    fd_reached_backend=True,
                    leaked_handle=leaked,
                )
            problem = _ack_problem(reply, token, correlation_id)
            if problem is not None:
                return HandoffFellBack(
                    HandoffStage.AWAIT_ACK,
                    FallbackReason.BACKEND_ACK_TIMEOUT,
                    problem,
                    fd_reached_backend=True,
                    leaked_handle=leaked,
                    backend_rejected=reply.token == token.raw and not reply.accepted,
                )
            verdict = self.acks.acknowledge(token, trio.current_time())
            if not isinstance(verdict, AckCompleted):
                return HandoffFellBack(
                    HandoffStage.ACKNOWLEDGE,
                    FallbackReason.BACKEND_ACK_TIMEOUT,
                    f"registry refused the ACK: {verdict.reason.value}",
                    fd_reached_backend=True,
                    leaked_handle=leaked,
                )
            return HandoffCompleted(correlation_id=correlation_id, waited_s=verdict.waited_s)
        finally:
            backend.handoff_waiters.pop(correlation_id, None)
            receive.close()

    async def _pass(
        self,
        channel: transports.ControlChannel,
        client: trio.abc.Stream,
        token: HandoffToken,
        correlation_id: int,
        reply_frame: bytes,
        backend: BackendHandle,
        adopt_by_ms: int,
    ) -> transports.PassReceipt | HandoffFellBack:
        """The send stage: reply, connection and offer, or a typed fallback."""

        def build_offer(passed: transports.PassReceipt) -> bytes:
            return control.handoff_offer(
                token=token.raw,
                service_name=backend.key.service_name,
                correlation_id=correlation_id,
                deadline_unix_ms=adopt_by_ms,
                handle_value=passed.handle_value,
            )

        try:
            return await channel.pass_connection_then_send(
                client, token.raw, build_offer, preface=reply_frame
            )
        except trio.BrokenResourceError as exc:
            return HandoffFellBack(
                HandoffStage.SEND,
                FallbackReason.BACKEND_ACK_TIMEOUT,
                f"the client connection failed before the pass: {exc}",
                fd_reached_backend=True,  # the reply may be half written: write nothing more
            )
        except transports.ConnectionPassError as exc:
            reason = (
                FallbackReason.PERMISSION_DENIED
                if exc.kind is transports.PassFailure.PERMISSION_DENIED
                else FallbackReason.BACKEND_ACK_TIMEOUT
            )
            return HandoffFellBack(
                HandoffStage.SEND,
                reason,
                f"passing the connection failed: {exc}",
                fd_reached_backend=exc.fd_may_have_reached_backend,
                leaked_handle=exc.leaked_handle,
            )
        except transports.TransportError as exc:
            return HandoffFellBack(
                HandoffStage.SEND,
                FallbackReason.BACKEND_ACK_TIMEOUT,
                f"control channel failed: {exc}",
                fd_reached_backend=True,
            )


def _ack_problem(
    reply: control.HandoffReply, token: HandoffToken, correlation_id: int
) -> str | None:
    """Check a HandoffAck in the reference order (facts §3.4); ``None`` if it is good."""
    if reply.frame_request_id != correlation_id:
        return "HandoffAck frame request_id does not match the correlation id"
    if reply.correlation_id != correlation_id:
        return "HandoffAck correlation_id does not match"
    if len(reply.token) != len(token.raw) or HandoffToken(reply.token) != token:
        return "HandoffAck token does not match the offered token"
    if not reply.accepted:
        return f"backend refused the handoff: {reply.detail or 'no detail provided'}"
    return None
