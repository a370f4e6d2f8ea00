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
import weakref
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from rpbroker._dropping_queue import DroppingQueue
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
    STOPPING = "stopping"
    STOPPED = "stopped"
    IDLE_QUIESCE = "idle-quiesce"
    HANDOFF_COMPLETED = "handoff-completed"
    HANDOFF_FALLBACK = "handoff-fallback"
    HANDOFF_SKIPPED = "handoff-skipped"
    BROADCAST_RESULT = "broadcast-result"
    HELLO_REFUSED = "hello-refused"
    PEER_DROPPED = "peer-dropped"
    FD_PRESSURE = "fd-pressure"
    FD_PRESSURE_CLEARED = "fd-pressure-cleared"
    #: One connection's handler raised; only that connection was closed.
    CONNECTION_FAILED = "connection-failed"
    #: Not a broker transition: a subscriber fell behind and lost ``dropped`` events.
    EVENTS_DROPPED = "events-dropped"


_LEVELS: Mapping[EventKind, int] = {
    EventKind.CRASHED: logging.WARNING,
    EventKind.UNAVAILABLE: logging.ERROR,
    EventKind.SPAWN_FAILED: logging.WARNING,
    EventKind.PEER_DROPPED: logging.WARNING,
    EventKind.FD_PRESSURE: logging.WARNING,
    EventKind.HELLO_REFUSED: logging.DEBUG,
    EventKind.HANDOFF_COMPLETED: logging.DEBUG,
    EventKind.HANDOFF_FALLBACK: logging.INFO,
    EventKind.HANDOFF_SKIPPED: logging.DEBUG,
    EventKind.CONNECTION_FAILED: logging.ERROR,
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


class EventSubscription:
    """Lifecycle events from the moment of subscribing, as an async iterator.

    Made by ``EventLog.subscribe`` (``Broker.iter_events``): events emitted after
    that call are buffered (up to ``SUBSCRIBER_BUFFER``) even before the first
    ``__anext__``. A subscriber that falls behind loses the oldest events it has
    not read; the next event it reads is then an ``EVENTS_DROPPED`` event whose
    ``details["dropped"]`` says how many were lost, and ``dropped`` counts them
    all. The subscription ends when ``close``/``aclose`` is called, when the
    ``async with`` block or the ``async for`` loop that uses it is left (a loop
    left by ``break`` releases the last reference, which closes it), or when the
    broker stops (iteration then finishes).
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._queue: DroppingQueue[LifecycleEvent] = DroppingQueue(SUBSCRIBER_BUFFER)

    @property
    def dropped(self) -> int:
        """Events this subscriber lost by falling behind, in all."""
        return self._queue.dropped

    def _push(self, event: LifecycleEvent) -> None:
        self._queue.push(event)

    def _end(self) -> None:
        self._queue.end()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> LifecycleEvent:
        """The next event; ``StopAsyncIteration`` once closed and drained.

        Cancellation: just stops waiting; no event is lost.
        """
        if not await self._queue.wait():
            raise StopAsyncIteration
        lost = self._queue.take_unreported()
        if lost:
            return LifecycleEvent(
                kind=EventKind.EVENTS_DROPPED,
                at_unix_ms=int(time.time() * 1000),
                reason=f"this subscriber fell behind and lost {lost} events",
                details={"dropped": lost},
            )
        return self._queue.pop()

    def close(self) -> None:
        """Unsubscribe now (idempotent); buffered events can still be read."""
        self._log._unsubscribe(self)
        self._end()

    async def aclose(self) -> None:
        """``close`` as an awaitable (for ``contextlib.aclosing``). Cancellation: none."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class EventLog:
    """Bounded event history plus live fan-out.

    ``emit`` is synchronous and never blocks. ``subscribe`` returns an
    ``EventSubscription`` of the events emitted after the call.
    """

    def __init__(self, capacity: int) -> None:
        self._recent: collections.deque[LifecycleEvent] = collections.deque(maxlen=capacity)
        self._subscribers: weakref.WeakSet[EventSubscription] = weakref.WeakSet()
        self._closed = False

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
        level = _LEVELS.get(kind, logging.INFO)
        if logger.isEnabledFor(level):  # the fields are only built for a line written
            logger.log(
                level,
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
        for sub in list(self._subscribers):
            sub._push(event)
        return event

    @property
    def subscriber_count(self) -> int:
        """Subscriptions still open (a follower that left is no longer counted)."""
        return len(self._subscribers)

    def recent(self) -> list[LifecycleEvent]:
        return list(self._recent)

    def subscribe(self) -> EventSubscription:
        """Every event emitted from now on (see ``EventSubscription``).

        Subscribers are held weakly: one whose last reference goes (a loop left
        by ``break``) is unsubscribed by that alone.
        """
        sub = EventSubscription(self)
        if self._closed:
            sub._end()
        else:
            self._subscribers.add(sub)
        return sub

    def _unsubscribe(self, sub: EventSubscription) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every subscription (their iterators finish once drained)."""
        self._closed = True
        for sub in list(self._subscribers):
            sub._end()
        self._subscribers.clear()
