"""Lifecycle events: a bounded log, ``logging`` output and async subscriptions.

What this module does: gives every broker transition (spawning, running, crashed,
retrying, unavailable, draining, stopped, handoff completed/fallback, broadcast
result, refusals, dropped peers) one structured value, keeps the most recent ones
in a bounded in-memory log (shown by admin DUMP), writes each through ``logging``,
and fans them out to subscribers as async iterators.

What it does not do: decide when a transition happens (the broker does), or ever
block the broker: a subscriber that falls behind loses events and is told how many.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import trio

from rpbroker.logfmt import KeyValues

logger = logging.getLogger("rpbroker.events")

#: Events buffered per subscriber before the oldest are dropped for that subscriber.
SUBSCRIBER_BUFFER = 256


class EventKind(enum.Enum):
    """What happened."""

    BROKER_STARTED = "broker-started"
    BROKER_STOPPING = "broker-stopping"
    BROKER_STOPPED = "broker-stopped"
    SPAWNING = "spawning"
    RUNNING = "running"
    SPAWN_FAILED = "spawn-failed"
    CRASHED = "crashed"
    RETRYING = "retrying"
    UNAVAILABLE = "unavailable"
    RECOVERED = "recovered"
    DRAINING = "draining"
    STOPPED = "stopped"
    IDLE_QUIESCE = "idle-quiesce"
    HANDOFF_COMPLETED = "handoff-completed"
    HANDOFF_FALLBACK = "handoff-fallback"
    BROADCAST_RESULT = "broadcast-result"
    HELLO_REFUSED = "hello-refused"
    PEER_DROPPED = "peer-dropped"
    FD_PRESSURE = "fd-pressure"
    FD_PRESSURE_CLEARED = "fd-pressure-cleared"


_LEVELS: Mapping[EventKind, int] = {
    EventKind.CRASHED: logging.WARNING,
    EventKind.UNAVAILABLE: logging.ERROR,
    EventKind.SPAWN_FAILED: logging.WARNING,
    EventKind.PEER_DROPPED: logging.WARNING,
    EventKind.FD_PRESSURE: logging.WARNING,
    EventKind.HELLO_REFUSED: logging.DEBUG,
    EventKind.HANDOFF_COMPLETED: logging.DEBUG,
    EventKind.HANDOFF_FALLBACK: logging.INFO,
}


@attrs.frozen
class LifecycleEvent:
    """One transition. ``details`` holds JSON-ready extra values."""

    kind: EventKind
    at_unix_ms: int
    service_name: str = ""
    service_version: str = ""
    pid: int = 0
    reason: str = ""
    details: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "at_unix_ms": self.at_unix_ms,
            "service_name": self.service_name,
            "service_version": self.service_version,
            "pid": self.pid,
            "reason": self.reason,
            "details": dict(self.details),
        }


@attrs.define
class _Subscriber:
    send: trio.MemorySendChannel[LifecycleEvent]
    dropped: int = 0


class EventLog:
    """Bounded event history plus live fan-out.

    ``emit`` is synchronous and never blocks. ``subscribe`` yields events emitted
    after the call; cancelling the iteration unsubscribes.
    """

    def __init__(self, capacity: int) -> None:
        self._recent: collections.deque[LifecycleEvent] = collections.deque(maxlen=capacity)
        self._subscribers: list[_Subscriber] = []

    def emit(
        self,
        kind: EventKind,
        *,
        service_name: str = "",
        service_version: str = "",
        pid: int = 0,
        reason: str = "",
        **details: Any,
    ) -> LifecycleEvent:
        event = LifecycleEvent(
            kind=kind,
            at_unix_ms=int(time.time() * 1000),
            service_name=service_name,
            service_version=service_version,
            pid=pid,
            reason=reason,
            details=details,
        )
        self._recent.append(event)
        logger.log(
            _LEVELS.get(kind, logging.INFO),
            KeyValues.from_mapping(
                {
                    "event": kind.value,
                    "service": service_name,
                    "version": service_version,
                    "pid": pid or None,
                    "reason": reason,
                    **details,
                }
            ),
        )
        for sub in self._subscribers:
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return event

    def recent(self) -> list[LifecycleEvent]:
        return list(self._recent)

    async def subscribe(self) -> AsyncIterator[LifecycleEvent]:
        """Yield every event emitted from now on.

        Cancellation: cancelling the consumer (or closing the generator) removes
        the subscription; nothing is left registered.
        """
        send, receive = trio.open_memory_channel[LifecycleEvent](SUBSCRIBER_BUFFER)
        sub = _Subscriber(send)
        self._subscribers.append(sub)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            self._subscribers.remove(sub)
            send.close()

    def close(self) -> None:
        """End every subscription (their iterators finish)."""
        for sub in self._subscribers:
            sub.send.close()
