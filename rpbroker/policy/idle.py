"""Idle tracking: which routable backends have been quiet long enough to quiesce.

What this module does: records the last activity of each tracked backend and
its idle timeout (30 s by default), hands out each backend once when it has been
idle for at least its timeout (it stops being tracked then: its quiesce makes it
unroutable, see ``rpbroker.policy.lifecycle``), and says when the next backend
falls due so the caller can sleep exactly until then.

What it leaves to its caller: tracking only routable backends (start at
readiness, remove when they leave RUNNING), reporting activity, sleeping until
:meth:`IdleTracker.next_due_at`, and quiescing what :meth:`IdleTracker.collect_due`
returns (or tracking it again with :meth:`IdleTracker.mark_activity` if it turns
out to be busy).

Cost: activity is O(1) when the backend is already scheduled (the common
case), otherwise O(log n); due times live in a min-heap whose stale entries are
re-scheduled or dropped lazily, so a sweep costs O(log n) per backend it
touches, whatever the number of backends.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

import attrs

from rpbroker.policy._units import clamp_duration_s

K = TypeVar("K", bound=Hashable)

#: Seconds without activity after which a backend is quiesced: long enough to keep
#: a warm backend through short pauses, short enough to free idle processes.
DEFAULT_IDLE_TIMEOUT_S: Final[float] = 30.0

#: Garbage heap entries tolerated (beyond twice the live count) before rebuilding.
_HEAP_SLACK: Final[int] = 64


@attrs.frozen
class IdleDue(Generic[K]):
    """A backend that has been idle for at least its timeout."""

    key: K
    #: Seconds since its last activity.
    idle_for_s: float
    #: Its configured idle timeout (seconds).
    timeout_s: float


@attrs.define
class _IdleEntry:
    last_active: float
    timeout_s: float
    #: Sequence number of the heap entry currently valid for this backend, if any.
    sched_seq: int | None = None
    #: Due time of that heap entry.
    sched_due: float = 0.0

    @property
    def due_at(self) -> float:
        return self.last_active + self.timeout_s


class IdleTracker(Generic[K]):
    """Per-backend idle deadlines. A non-positive timeout becomes 1 ms."""

    __slots__ = ("_entries", "_heap", "_seq")

    def __init__(self) -> None:
        self._entries: dict[K, _IdleEntry] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def mark_activity(self, key: K, now: float, timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        """Record activity at ``now`` with idle timeout ``timeout_s`` (clamped); track it if new."""
        timeout = clamp_duration_s(timeout_s)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _IdleEntry(now, timeout)
        else:
            entry.timeout_s = timeout
            entry.last_active = now
        # A heap entry due no later than the new due time is kept: when it pops,
        # the sweep sees the later due time and re-schedules (lazy re-scheduling).
        if entry.sched_seq is None or entry.due_at < entry.sched_due:
            self._schedule(key, entry)

    def remove(self, key: K) -> bool:
        """Stop tracking a backend; False when unknown."""
        if self._entries.pop(key, None) is None:
            return False
        self._maybe_compact()
        return True

    def collect_due(self, now: float) -> list[IdleDue[K]]:
        """Remove and return every backend idle for at least its timeout, earliest due first.

        A backend is due once ``last_active + timeout_s <= now``.
        """
        due: list[IdleDue[K]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            sched_due, seq, key = heapq.heappop(heap)
            entry = self._live(key, seq)
            if entry is None:
                continue
            entry.sched_seq = None
            if entry.due_at != sched_due:
                # Activity since it was scheduled: re-file at the (strictly later)
                # real due time, so results come out in due order and the loop
                # always makes progress.
                self._schedule(key, entry)
                continue
            del self._entries[key]
            due.append(IdleDue(key, now - entry.last_active, entry.timeout_s))
        return due

    def next_due_at(self) -> float | None:
        """Earliest monotonic time a tracked backend falls due, or None."""
        heap = self._heap
        while heap:
            sched_due, seq, key = heap[0]
            entry = self._live(key, seq)
            if entry is not None:
                if entry.due_at <= sched_due:
                    return entry.due_at
                heapq.heappop(heap)
                self._schedule(key, entry)  # stale due time: re-file it
                continue
            heapq.heappop(heap)
        return None

    def _live(self, key: K, seq: int) -> _IdleEntry | None:
        entry = self._entries.get(key)
        if entry is None or entry.sched_seq != seq:
            return None
        return entry

    def _schedule(self, key: K, entry: _IdleEntry) -> None:
        seq = next(self._seq)
        entry.sched_seq = seq
        entry.sched_due = entry.due_at
        heapq.heappush(self._heap, (entry.sched_due, seq, key))
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if len(self._heap) > 2 * len(self._entries) + _HEAP_SLACK:
            self._heap = [
                (entry.sched_due, entry.sched_seq, key)
                for key, entry in self._entries.items()
                if entry.sched_seq is not None
            ]
            heapq.heapify(self._heap)
