"""Handoff as a plan, then its delivery: pass a client's connection to its backend or fall back.

What this module does: :meth:`HandoffCoordinator.plan` answers, for one
negotiated Hello, whether to attempt a handoff: a :class:`HandoffPlan` (a
one-time token registered in the pending-ACK registry, a correlation id and the
adoption deadline agreed by broker, backend and client) or a
:class:`ReconnectPlan` with the typed reason. Every plan is counted in the
metrics, and every fallback plan is an event. :meth:`HandoffCoordinator.deliver`
then runs one attempt in its own nursery: write the ``Negotiated`` reply, pass
the connection and the offer over the backend's control link, and wait (under
``trio.move_on_at`` the registry's ACK deadline) for the backend's HandoffAck,
while the nursery's watchers abandon the attempt if the broker starts stopping
or the client hangs up. The HandoffAck is checked and recorded (registry,
failed-attempt budget) in the link reader's own step, the moment it arrives.

Every outcome is typed and says what really happened (:class:`AttemptFailure`),
and what has been written to the client is explicit (:class:`ClientWrites`): the
caller sends the plain reconnect reply when nothing was written, may send a
rejection EVENT only after a complete ``Negotiated`` and only when the connection
never reached the backend, and writes nothing otherwise.

The delivery guarantee (documented in the README): a backend adopts only before
the adoption deadline carried in the offer; the client learns the same deadline
from the reply frame (``Frame.deadline_unix_ms``) and re-sends its
``initial_data`` on the reconnect route only after an explicit rejection or
after that deadline plus a grace, so a connection is served by exactly one
backend and a request is never delivered twice.

What it does not do: write to the client after the connection has been passed
(the backend writes the handoff-ready EVENT itself), raise for transport,
delivery or registry errors, or decide what the client does next.
"""

from __future__ import annotations

import contextlib
import enum
import time
from typing import Final

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog
from rpbroker.metrics import BrokerMetrics
from rpbroker.policy._units import ms_ceil
from rpbroker.policy.ack import AckCompleted, AckRegistry, BackendRef
from rpbroker.policy.fallback import (
    Attempt,
    AttemptResult,
    FallbackPolicy,
    FallbackReason,
    FallbackState,
    HandoffInputs,
)
from rpbroker.policy.tokens import HandoffToken, TokenStore, TokenStoreError
from rpbroker.supervisor import BackendKey, Incarnation
from rpbroker.supervisor.link import BackendLink, LinkClosedError


class AttemptFailure(enum.Enum):
    """What went wrong in one attempt (the fallback reason that really happened)."""

    #: The backend stopped being routable between the plan and the send.
    BACKEND_NOT_ROUTABLE = "backend-not-routable"
    #: The backend's control link closed (before the pass, or before its ACK).
    LINK_CLOSED = "link-closed"
    #: The ``Negotiated`` reply could not be written: the client is gone (abandoned).
    CLIENT_WRITE_FAILED = "client-write-failed"
    #: The kernel refused to pass the descriptor (EPERM/EACCES).
    PASS_PERMISSION_DENIED = "pass-permission-denied"
    #: Passing the descriptor failed otherwise.
    PASS_FAILED = "pass-failed"
    #: The ACK deadline passed before the connection could be sent.
    SEND_TIMEOUT = "send-timeout"
    #: No HandoffAck before the ACK deadline.
    ACK_TIMEOUT = "ack-timeout"
    #: A HandoffAck whose request id, correlation id or token do not match.
    ACK_MISMATCH = "ack-mismatch"
    #: The backend explicitly refused the connection (it told the client itself).
    BACKEND_REJECTED = "backend-rejected"
    #: The registry refused the ACK (it arrived after the deadline).
    ACK_LATE = "ack-late"
    #: Abandoned: the client hung up during the attempt (noticed by the broker, or
    #: by the backend while confirming the handoff).
    CLIENT_GONE = "client-gone"
    #: Abandoned: the broker began shutting down.
    BROKER_STOPPING = "broker-stopping"
    #: Abandoned: the attempt's task was cancelled.
    CANCELLED = "cancelled"

    @property
    def result(self) -> AttemptResult:
        """How it counts for the failed-attempt budget (abandonments do not count)."""
        if self in _ABANDONMENTS:
            return AttemptResult.ABANDONED
        return AttemptResult.FAILED

    @property
    def fallback_reason(self) -> FallbackReason:
        """The reference's coarser reason for this failure."""
        if self is AttemptFailure.PASS_PERMISSION_DENIED:
            return FallbackReason.PERMISSION_DENIED
        if self is AttemptFailure.ACK_MISMATCH:
            return FallbackReason.INTEGRITY_MISMATCH
        return FallbackReason.BACKEND_ACK_TIMEOUT


_ABANDONMENTS: Final = frozenset(
    {
        AttemptFailure.CLIENT_WRITE_FAILED,
        AttemptFailure.CLIENT_GONE,
        AttemptFailure.BROKER_STOPPING,
        AttemptFailure.CANCELLED,
    }
)


class ClientWrites(enum.Enum):
    """What the broker has written on the client's connection so far."""

    #: Nothing: the broker may still send any reply.
    NOTHING = "nothing"
    #: Part of the reply may be out (a failed or interrupted write): write nothing more.
    PARTIAL = "partial"
    #: The complete ``Negotiated`` reply; the connection never left the broker.
    REPLY = "reply"
    #: The reply, and the connection may have reached the backend: never write again.
    HANDED_OFF = "handed-off"


@attrs.frozen
class HandoffPlan:
    """Attempt a handoff with this token, correlation id and agreed adoption deadline."""

    token: HandoffToken
    correlation_id: int
    #: Wall-clock ms after which the backend never adopts (offer and reply carry it).
    adopt_by_unix_ms: int
    #: Monotonic deadline of the backend's ACK (the registry's).
    ack_deadline: float


@attrs.frozen
class ReconnectPlan:
    """No handoff: reply with the backend endpoint and let the client reconnect."""

    reason: FallbackReason
    retry_after_s: float | None = None


Plan = HandoffPlan | ReconnectPlan


@attrs.frozen
class HandoffCompleted:
    """The backend adopted the connection and acknowledged within the deadline."""

    correlation_id: int
    waited_s: float


@attrs.frozen
class HandoffFellBack:
    """The attempt failed or was abandoned; the client falls back to reconnect.

    ``writes``: what is on the client's connection now (see :class:`ClientWrites`).
    ``leaked_handle``: on Windows, the duplicated handle left in the backend's table.
    """

    failure: AttemptFailure
    detail: str
    writes: ClientWrites
    leaked_handle: int | None = None

    @property
    def fd_reached_backend(self) -> bool:
        """Whether the backend may hold the connection (it can never adopt it now)."""
        return self.writes is ClientWrites.HANDED_OFF


HandoffOutcome = HandoffCompleted | HandoffFellBack


@attrs.define
class _Attempt:
    """One attempt's state: its plan, what was written, and its result once known."""

    plan: HandoffPlan
    key: BackendKey
    writes: ClientWrites = ClientWrites.NOTHING
    leaked_handle: int | None = None
    outcome: HandoffOutcome | None = None


class HandoffCoordinator:
    """Tokens, pending ACKs and the failed-attempt budget; plans and delivers attempts."""

    def __init__(self, config: BrokerConfig, events: EventLog, metrics: BrokerMetrics) -> None:
        self._config = config
        self._events = events
        self._metrics = metrics
        self.tokens = TokenStore()
        self.acks = AckRegistry(self.tokens, deadline_s=config.ack_deadline_s)
        self._fallback: FallbackState[BackendKey] = FallbackState(FallbackPolicy())

    # -- plan ---------------------------------------------------------------------------

    def plan(
        self,
        *,
        client_opted_in: bool,
        backend: Incarnation,
        fd_pressure: bool,
        connection_id: int,
        hello_deadline_unix_ms: int,
        now: float,
    ) -> Plan:
        """Decide for one negotiated Hello; an attempt holds a registered token.

        The attempt's correlation id is the connection id (as in the reference).
        The adoption deadline is the broker's adoption window from now, but never
        later than the Hello's own deadline (``Frame.deadline_unix_ms``, 0 = none).
        """
        inputs = HandoffInputs(
            client_opted_in=client_opted_in,
            service_allows=self._config.handoff_enabled and backend.spec.handoff,
            fd_pressure=fd_pressure,
            backend_has_control_channel=backend.has_control_channel,
        )
        decision = self._fallback.should_attempt(backend.key, inputs, now)
        if not isinstance(decision, Attempt):
            return self._reconnect(backend, ReconnectPlan(decision.reason, decision.retry_after_s))
        try:
            token = self.tokens.issue(now)
        except TokenStoreError as exc:
            return self._reconnect(
                backend, ReconnectPlan(FallbackReason.TOKEN_UNAVAILABLE), detail=str(exc)
            )
        ack_deadline = self.acks.register(
            token, BackendRef(backend.key.service_name, backend.pid), now
        )
        adopt_by = int((time.time() + self._config.handoff_adopt_window_s) * 1000)
        if hello_deadline_unix_ms:
            adopt_by = min(adopt_by, hello_deadline_unix_ms)
        self._fallback.attempt_started(backend.key)
        self._metrics.handoff_plan("attempt")
        return HandoffPlan(token, connection_id, adopt_by, ack_deadline)

    def _reconnect(
        self, backend: Incarnation, plan: ReconnectPlan, detail: str = ""
    ) -> ReconnectPlan:
        self._metrics.handoff_plan(plan.reason.value)
        if plan.reason is not FallbackReason.CLIENT_UNSUPPORTED:
            self._events.emit(
                EventKind.HANDOFF_SKIPPED,
                service_name=backend.key.service_name,
                service_version=backend.key.service_version,
                pid=backend.pid,
                reason=detail or plan.reason.value,
                fallback=plan.reason.value,
                retry_after_ms=None if plan.retry_after_s is None else ms_ceil(plan.retry_after_s),
            )
        return plan

    # -- deliver ------------------------------------------------------------------------

    async def deliver(
        self,
        plan: HandoffPlan,
        client: trio.abc.Stream,
        backend: Incarnation,
        reply_frame: bytes,
        stopping: trio.Event,
    ) -> HandoffOutcome:
        """Run one attempt of ``plan``: reply, pass the connection, await the ACK.

        ``reply_frame`` (the framed Negotiated, carrying the adoption deadline) is
        written on the connection by the transport immediately before the
        connection is passed, in the same scheduler slice when no buffer is full.
        Once the connection has been handed off, ``deliver`` closes the broker's
        copy at once; otherwise the caller acts on the outcome's ``writes`` and
        closes it (closing twice is harmless).

        Cancellation: the attempt runs in its own nursery, whose watchers
        abandon it when the broker starts stopping or the client hangs up;
        cancelling ``deliver`` abandons it the same way. Every way out revokes
        the token and removes the pending entry. Never raises for transport,
        delivery or registry errors.
        """
        attempt = _Attempt(plan, backend.key)
        abandon = trio.CancelScope()
        watch_client_scope = trio.CancelScope()
        cause = AttemptFailure.CANCELLED
        try:
            async with trio.open_nursery() as watchers:

                async def watch_client() -> None:
                    # Until the connection leaves: afterwards the backend owns it.
                    nonlocal cause
                    with watch_client_scope, contextlib.suppress(trio.ClosedResourceError):
                        if await transports.wait_peer_closed(client):
                            cause = AttemptFailure.CLIENT_GONE
                            abandon.cancel()

                async def watch_stopping() -> None:
                    nonlocal cause
                    await stopping.wait()
                    cause = AttemptFailure.BROKER_STOPPING
                    abandon.cancel()

                watchers.start_soon(watch_stopping)
                watchers.start_soon(watch_client)
                with abandon:
                    await self._run(attempt, client, backend, reply_frame, watch_client_scope)
                watchers.cancel_scope.cancel()
            if attempt.outcome is None:
                self._end(attempt, cause, "the attempt was abandoned")
        finally:
            if attempt.outcome is None:  # cancelled from outside
                self._end(attempt, AttemptFailure.CANCELLED, "the attempt was cancelled")
            self._announce(attempt, backend)
        assert attempt.outcome is not None
        return attempt.outcome

    async def _run(
        self,
        attempt: _Attempt,
        client: trio.abc.Stream,
        backend: Incarnation,
        reply_frame: bytes,
        watch_client_scope: trio.CancelScope,
    ) -> None:
        plan = attempt.plan
        link = backend.link
        if link is None or link.closed or not backend.routable:
            await trio.lowlevel.checkpoint()
            self._end(attempt, AttemptFailure.BACKEND_NOT_ROUTABLE, "the backend left service")
            return
        with (
            link.expect_handoff(
                plan.correlation_id, lambda reply: self._on_reply(attempt, reply)
            ) as slot,
            trio.move_on_at(plan.ack_deadline),
        ):
            # One deadline (the registry's) bounds the pass and the ACK wait alike.
            if not await self._pass(attempt, client, link, backend, reply_frame):
                return
            # The backend holds the connection now: the broker's copy is closed at
            # once (the caller's later close is a no-op), and a hang-up of the
            # client no longer concerns this attempt.
            watch_client_scope.cancel()
            await client.aclose()
            # When the wait ends, _on_reply has recorded the result (LINK_CLOSED too).
            with contextlib.suppress(LinkClosedError):
                await slot.wait()
            return
        if attempt.writes is ClientWrites.HANDED_OFF:
            self._end(attempt, AttemptFailure.ACK_TIMEOUT, "no HandoffAck before the deadline")
        else:
            self._end(attempt, AttemptFailure.SEND_TIMEOUT, "the deadline passed during the send")

    async def _pass(
        self,
        attempt: _Attempt,
        client: trio.abc.Stream,
        link: BackendLink,
        backend: Incarnation,
        reply_frame: bytes,
    ) -> bool:
        """The send stage; ``False`` (with the attempt ended) if it failed."""
        plan = attempt.plan

        def build_offer(passed: transports.PassReceipt) -> bytes:
            # Reached only once the reply is written and the descriptor has left.
            attempt.writes = ClientWrites.HANDED_OFF
            attempt.leaked_handle = passed.duplicated_handle
            return control.handoff_offer(
                token=plan.token.raw,
                service_name=backend.key.service_name,
                correlation_id=plan.correlation_id,
                deadline_unix_ms=plan.adopt_by_unix_ms,
                handle_value=passed.handle_value,
            )

        try:
            attempt.writes = ClientWrites.PARTIAL
            await link.pass_connection(client, plan.token.raw, build_offer, preface=reply_frame)
        except trio.BrokenResourceError as exc:
            self._end(attempt, AttemptFailure.CLIENT_WRITE_FAILED, f"writing the reply: {exc}")
            return False
        except transports.ConnectionPassError as exc:
            if attempt.writes is ClientWrites.PARTIAL:
                attempt.writes = (
                    ClientWrites.HANDED_OFF
                    if exc.fd_may_have_reached_backend
                    else ClientWrites.REPLY
                )
            attempt.leaked_handle = exc.leaked_handle
            failure = (
                AttemptFailure.PASS_PERMISSION_DENIED
                if exc.kind is transports.PassFailure.PERMISSION_DENIED
                else AttemptFailure.LINK_CLOSED
                if exc.kind is transports.PassFailure.BACKEND_UNAVAILABLE
                else AttemptFailure.PASS_FAILED
            )
            self._end(attempt, failure, f"passing the connection: {exc}")
            return False
        except transports.TransportError as exc:
            self._end(attempt, AttemptFailure.LINK_CLOSED, f"control channel: {exc}")
            return False
        except trio.Cancelled:
            if attempt.writes is ClientWrites.NOTHING:
                attempt.writes = ClientWrites.PARTIAL
            raise
        return True

    def _on_reply(self, attempt: _Attempt, reply: control.HandoffReply | None) -> None:
        """Check and record the backend's answer, in the link reader's step."""
        if reply is None:
            self._end(attempt, AttemptFailure.LINK_CLOSED, "the backend's control link closed")
            return
        plan = attempt.plan
        problem = _ack_problem(reply, plan.token, plan.correlation_id)
        if problem is not None:
            failure = AttemptFailure.ACK_MISMATCH
            if reply.token == plan.token.raw and not reply.accepted:
                failure = (
                    AttemptFailure.CLIENT_GONE
                    if reply.detail == control.CLIENT_GONE_DETAIL
                    else AttemptFailure.BACKEND_REJECTED
                )
            self._end(attempt, failure, problem)
            return
        verdict = self.acks.acknowledge(plan.token, trio.current_time())
        if not isinstance(verdict, AckCompleted):
            self._end(
                attempt,
                AttemptFailure.ACK_LATE,
                f"registry refused the ACK: {verdict.reason.value}",
            )
            return
        if attempt.outcome is not None:  # pragma: no cover - the token would not be pending
            return
        attempt.outcome = HandoffCompleted(plan.correlation_id, verdict.waited_s)
        self._fallback.attempt_ended(attempt.key, AttemptResult.SUCCEEDED, trio.current_time())

    def _end(self, attempt: _Attempt, failure: AttemptFailure, detail: str) -> None:
        """Record a failed or abandoned attempt (first result wins; the token is revoked)."""
        if attempt.outcome is not None:
            return
        self.acks.abandon(attempt.plan.token)
        attempt.outcome = HandoffFellBack(failure, detail, attempt.writes, attempt.leaked_handle)
        self._fallback.attempt_ended(attempt.key, failure.result, trio.current_time())

    def _announce(self, attempt: _Attempt, backend: Incarnation) -> None:
        outcome = attempt.outcome
        key = backend.key
        if isinstance(outcome, HandoffCompleted):
            self._metrics.handoff_result("completed")
            self._events.emit(
                EventKind.HANDOFF_COMPLETED,
                service_name=key.service_name,
                service_version=key.service_version,
                pid=backend.pid,
                correlation_id=outcome.correlation_id,
                waited_ms=round(outcome.waited_s * 1000, 3),
            )
            return
        assert isinstance(outcome, HandoffFellBack)
        self._metrics.handoff_result(outcome.failure.value)
        self._events.emit(
            EventKind.HANDOFF_FALLBACK,
            service_name=key.service_name,
            service_version=key.service_version,
            pid=backend.pid,
            reason=outcome.detail,
            failure=outcome.failure.value,
            fallback=outcome.failure.fallback_reason.value,
            fd_reached_backend=outcome.fd_reached_backend,
            correlation_id=attempt.plan.correlation_id,
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
