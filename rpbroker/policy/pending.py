"""Pending handoff queue: a small bounded FIFO of handoffs waiting for a slot.

What this module does: holds handoffs that are ready to be attempted but must
wait (for example behind a busy backend control channel), at most 64 at once
and each for at most 100 ms. Expired entries leave first, in order; when the
queue is still full an enqueue overflows, and an overflow or an expiry is a
silent fallback to the reconnect route, never a client error.

What it leaves to its caller: what an item is, reading the clock, draining the
queue, and sending the reconnect route for overflowed or expired items.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Generic, TypeVar

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s
from rpbroker.policy.fallback import Fallback, FallbackReason

#: Handoffs that may wait at once; beyond this the broker is overloaded and the
#: reconnect route is cheaper than queueing.
DEFAULT_MAX_PENDING_HANDOFFS: Final[int] = 64
#: Seconds a handoff may wait in the queue: past this, reconnecting is faster.
DEFAULT_PENDING_HANDOFF_TTL_S: Final[float] = 0.1

T = TypeVar("T")


@attrs.frozen
class PendingOverflow:
    """Decision: the queue is full; fall back to reconnect."""

    max_pending: int
    #: The reference reports an overflow as fd/handle pressure.
    reason: FallbackReason = FallbackReason.FD_PRESSURE_DISABLED

    def fallback(self) -> Fallback:
        """The silent reconnect fallback for the overflowed handoff."""
        return Fallback(self.reason)


class PendingHandoffQueue(Generic[T]):
    """Bounded FIFO with a time-to-live. Counts below 1 become 1; durations 1 ms.

    An entry expires at ``now >= enqueued_at + ttl_s``. Entries expire from the
    front, which holds the oldest entry as long as ``now`` never goes backwards.
    """

    __slots__ = ("_entries", "_max_pending", "_ttl_s")

    def __init__(
        self,
        max_pending: int = DEFAULT_MAX_PENDING_HANDOFFS,
        ttl_s: float = DEFAULT_PENDING_HANDOFF_TTL_S,
    ) -> None:
        self._max_pending = clamp_count(max_pending)
        self._ttl_s = clamp_duration_s(ttl_s)
        self._entries: deque[tuple[float, T]] = deque()

    @property
    def max_pending(self) -> int:
        """Capacity (entries)."""
        return self._max_pending

    @property
    def ttl_s(self) -> float:
        """Time-to-live of each entry (seconds)."""
        return self._ttl_s

    def __len__(self) -> int:
        return len(self._entries)

    def enqueue(self, item: T, now: float) -> PendingOverflow | None:
        """Expire old entries, then append ``item``; an overflow when still full.

        Expired items are dropped here; call :meth:`expire` first to learn which.
        """
        self.expire(now)
        if len(self._entries) >= self._max_pending:
            return PendingOverflow(self._max_pending)
        self._entries.append((now + self._ttl_s, item))
        return None

    def dequeue(self, now: float) -> T | None:
        """Expire old entries, then pop the oldest live item (None when empty)."""
        self.expire(now)
        if not self._entries:
            return None
        return self._entries.popleft()[1]

    def expire(self, now: float) -> list[T]:
        """Remove and return the items expired at ``now``, oldest first."""
        expired: list[T] = []
        entries = self._entries
        while entries and entries[0][0] <= now:
            expired.append(entries.popleft()[1])
        return expired
