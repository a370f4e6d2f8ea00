"""Lifecycle broadcast fan-out: one operation to many backends at once, one deadline for all.

What this module does: :func:`fan_out` sends a release-handles or quiesce
operation to every target incarnation concurrently over its control link, each
wait bounded by one shared ACK deadline, and collects what happened to each
(acked, timed out, failed, skipped because it is dead, or skipped because it
is a foreign backend without a control channel: a quiesce stops it with
SIGTERM instead) into a
``BroadcastResult``. A target that is still starting is waited for (within the
same deadline) and then sent the operation; a draining one still receives it
(it is alive and may hold handles). A quiesce makes its target unroutable at
the moment it is sent (``Incarnation.quiesce_sent``) and bounds its drain.

What it does not do: choose the targets or emit the result (the registry
does), or decide what a dead backend is beyond "its process has exited".
"""

from __future__ import annotations

import math
from typing import Final

import trio

from rpbroker.policy.broadcast import (
    BackendAcked,
    BackendFailed,
    BackendSkippedDead,
    BackendSkippedNoControl,
    BackendTimedOut,
    BroadcastCollector,
    BroadcastFailure,
    BroadcastOperation,
    BroadcastOutcome,
    BroadcastResult,
    Quiesce,
    QuiesceReason,
)
from rpbroker.policy.lifecycle import StopCause
from rpbroker.supervisor.incarnation import Incarnation
from rpbroker.supervisor.link import LinkClosedError

#: How long a broadcast waits to learn whether a backend whose link just closed has
#: exited (reported as dead) or not (reported as failed), seconds: the link's EOF
#: and the process exit arrive within milliseconds of each other.
EXIT_CONFIRM_S: Final[float] = 0.1


async def fan_out(
    targets: list[Incarnation],
    operation: BroadcastOperation,
    *,
    ack_timeout_s: float,
    drain_deadline: float,
) -> BroadcastResult[Incarnation]:
    """Send ``operation`` to every target concurrently and collect the outcomes.

    One ACK deadline, ``ack_timeout_s`` from now, bounds every wait alike,
    however late each task starts; ``drain_deadline`` (monotonic seconds) is
    what a quiesce gives each target to finish its connections.

    Cancellation: abandons the outstanding waits (their correlations are
    removed, late answers ignored); quiesces already sent stay sent.
    """
    ack_deadline = trio.current_time() + ack_timeout_s
    collector = BroadcastCollector(operation, targets, ack_timeout_s)

    async def one(incarnation: Incarnation) -> None:
        collector.record(
            await _send_one(incarnation, operation, ack_timeout_s, ack_deadline, drain_deadline)
        )

    async with trio.open_nursery() as nursery:
        for incarnation in targets:
            nursery.start_soon(one, incarnation)
    return collector.result()


async def _send_one(
    incarnation: Incarnation,
    operation: BroadcastOperation,
    timeout_s: float,
    ack_deadline: float,
    drain_deadline: float,
) -> BroadcastOutcome[Incarnation]:
    with trio.move_on_at(ack_deadline):
        if incarnation.lifecycle.starting:
            await incarnation.settled.wait()
        if incarnation.exited.is_set() or incarnation.spawn_failure is not None:
            await trio.lowlevel.checkpoint()
            return BackendSkippedDead(incarnation)
        if not incarnation.has_control_channel:
            await trio.lowlevel.checkpoint()
            return _without_control_channel(incarnation, operation, drain_deadline)
        link = incarnation.link
        if link is None:
            await trio.lowlevel.checkpoint()
            return BackendSkippedDead(incarnation)
        if isinstance(operation, Quiesce):
            incarnation.quiesce_sent(operation.reason, drain_deadline)
        try:
            reply = await link.broadcast(
                operation,
                drain_deadline_ms=_remaining_ms(drain_deadline),
                ack_timeout_ms=_remaining_ms(ack_deadline),
            )
        except LinkClosedError:
            with trio.move_on_after(EXIT_CONFIRM_S):
                await incarnation.exited.wait()
            if incarnation.exited.is_set():
                return BackendSkippedDead(incarnation)
            return BackendFailed(
                incarnation, BroadcastFailure.BACKEND_ERROR, "the control link closed"
            )
        if reply.failure is None:
            return BackendAcked(incarnation)
        return BackendFailed(incarnation, reply.failure, reply.detail)
    return BackendTimedOut(incarnation, timeout_s)


def _without_control_channel(
    incarnation: Incarnation, operation: BroadcastOperation, drain_deadline: float
) -> BackendSkippedNoControl[Incarnation]:
    """What a broadcast does to a foreign backend: nothing can be sent; a quiesce is a stop.

    A quiesce becomes SIGTERM now and SIGKILL at the drain deadline (the backend
    cannot be asked to drain, so it gets the drain time to exit on SIGTERM). A
    backend already stopping keeps its earlier kill time.
    """
    if isinstance(operation, Quiesce):
        cause = (
            StopCause.BROKER_SHUTDOWN
            if operation.reason is QuiesceReason.BROKER_SHUTDOWN
            else StopCause.REQUESTED
        )
        grace_s = max(0.0, drain_deadline - trio.current_time())
        incarnation.stop(cause, grace_s=grace_s)
        return BackendSkippedNoControl(
            incarnation,
            "foreign backend has no control channel: sent SIGTERM instead of the quiesce "
            f"(SIGKILL at the drain deadline, {grace_s:.3g} s)",
        )
    return BackendSkippedNoControl(
        incarnation, "foreign backend has no control channel: the operation was not sent"
    )


def _remaining_ms(deadline: float) -> int:
    """Milliseconds from now until ``deadline`` (at least 1; 0 for no deadline)."""
    if math.isinf(deadline):
        return 0
    return max(1, int((deadline - trio.current_time()) * 1000))
