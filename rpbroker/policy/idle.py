"""Idle tracking: which backends have been quiet long enough to quiesce.

What this module does: records the last activity of each backend and its idle
timeout (30 s by default), reports each running backend once when it has been
idle for at least its timeout (moving it to DRAINING so it is never reported
again until new activity revives it), and says when the next backend falls due
so the caller can sleep exactly until then.

What it leaves to its caller: reporting activity, sleeping until
:meth:`IdleTracker.next_due_at`, quiescing due backends through the broadcast
path, and marking them quiesced or removing them.

Cost: activity is O(1) when the backend is already scheduled (the common
case), otherwise O(log n); due times live in a min-heap whose stale entries are
re-scheduled or dropped lazily, so a sweep costs O(log n) per backend it
touches, whatever the number of backends.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Hashable
from typing import Final

import attrs

from rpbroker.policy._units import clamp_duration_s
from rpbroker.policy.broadcast import QuiesceReason

#: Seconds without activity after which a backend is quiesced: long enough to keep
#: a warm backend through short pauses, short enough to free idle processes.
DEFAULT_IDLE_TIMEOUT_S: Final[float] = 30.0

#: Garbage heap entries tolerated (beyond twice the live count) before rebuilding.
_HEAP_SLACK: Final[int] = 64


class BackendLifecycle(enum.Enum):
    """Idle-tracking state of one backend."""

    RUNNING = "running"
    DRAINING = "draining"
    QUIESCED = "quiesced"


@attrs.frozen
class IdleDue:
    """A running backend that has been idle for at least its timeout."""

    key: Hashable
    #: Seconds since its last activity.
    idle_for_s: float
    #: Its configured idle timeout (seconds).
    timeout_s: float
    reason: QuiesceReason = QuiesceReason.IDLE_TIMEOUT


@attrs.define
class _IdleEntry:
    last_active: float
    timeout_s: float
    state: BackendLifecycle
    #: Sequence number of the heap entry currently valid for this backend, if any.
    sched_seq: int | None = None
    #: Due time of that heap entry.
    sched_due: float = 0.0

    @property
    def due_at(self) -> float:
        return self.last_active + self.timeout_s


class IdleTracker:
    """Per-backend idle deadlines. A non-positive timeout becomes 1 ms."""

    __slots__ = ("_default_timeout_s", "_entries", "_heap", "_seq")

    def __init__(self, default_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self._default_timeout_s = clamp_duration_s(default_timeout_s)
        self._entries: dict[Hashable, _IdleEntry] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    @property
    def default_timeout_s(self) -> float:
        """Timeout used for backends registered without one (seconds)."""
        return self._default_timeout_s

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Tracked backends, in first-seen order."""
        return list(self._entries)

    def state(self, key: Hashable) -> BackendLifecycle | None:
        """The backend's state, or None when it is not tracked."""
        entry = self._entries.get(key)
        return None if entry is None else entry.state

    def last_active(self, key: Hashable) -> float | None:
        """Monotonic time of the backend's last activity, or None when not tracked."""
        entry = self._entries.get(key)
        return None if entry is None else entry.last_active

    def timeout_of(self, key: Hashable) -> float | None:
        """The backend's idle timeout (seconds), or None when not tracked."""
        entry = self._entries.get(key)
        return None if entry is None else entry.timeout_s

    def mark_activity(self, key: Hashable, now: float, timeout_s: float | None = None) -> None:
        """Record activity at ``now``; the backend becomes (or stays) RUNNING.

        ``timeout_s`` sets the backend's idle timeout (clamped); when omitted, a
        tracked backend keeps its timeout and a new one gets the default. Activity
        revives DRAINING and QUIESCED backends.
        """
        entry = self._entries.get(key)
        if entry is None:
            timeout = self._default_timeout_s if timeout_s is None else clamp_duration_s(timeout_s)
            entry = _IdleEntry(now, timeout, BackendLifecycle.RUNNING)
            self._entries[key] = entry
        else:
            if timeout_s is not None:
                entry.timeout_s = clamp_duration_s(timeout_s)
            entry.last_active = now
            entry.state = BackendLifecycle.RUNNING
        # A heap entry due no later than the new due time is kept: when it pops,
        # the sweep sees the later due time and re-schedules (lazy re-scheduling).
        if entry.sched_seq is None or entry.due_at < entry.sched_due:
            self._schedule(key, entry)

    def mark_draining(self, key: Hashable) -> bool:
        """Move a tracked backend to DRAINING; False when unknown."""
        return self._set_state(key, BackendLifecycle.DRAINING)

    def mark_quiesced(self, key: Hashable) -> bool:
        """Move a tracked backend to QUIESCED; False when unknown."""
        return self._set_state(key, BackendLifecycle.QUIESCED)

    def remove(self, key: Hashable) -> bool:
        """Stop tracking a backend; False when unknown."""
        if self._entries.pop(key, None) is None:
            return False
        self._maybe_compact()
        return True

    def collect_due(self, now: float) -> list[IdleDue]:
        """Move every RUNNING backend idle for at least its timeout to DRAINING.

        A backend is due once ``last_active + timeout_s <= now``. Returns them,
        earliest due first. DRAINING and QUIESCED backends are never reported; a
        backend is reported again only after new activity.
        """
        due: list[IdleDue] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            sched_due, seq, key = heapq.heappop(heap)
            entry = self._live(key, seq)
            if entry is None:
                continue
            entry.sched_seq = None
            if entry.state is not BackendLifecycle.RUNNING:
                continue
            if entry.due_at != sched_due:
                # Activity since it was scheduled: re-file at the (strictly later)
                # real due time, so results come out in due order and the loop
                # always makes progress.
                self._schedule(key, entry)
                continue
            entry.state = BackendLifecycle.DRAINING
            due.append(IdleDue(key, now - entry.last_active, entry.timeout_s))
        return due

    def next_due_at(self) -> float | None:
        """Earliest monotonic time a RUNNING backend falls due, or None."""
        heap = self._heap
        while heap:
            sched_due, seq, key = heap[0]
            entry = self._live(key, seq)
            if entry is not None and entry.state is BackendLifecycle.RUNNING:
                if entry.due_at <= sched_due:
                    return entry.due_at
                heapq.heappop(heap)
                self._schedule(key, entry)  # stale due time: re-file it
                continue
            heapq.heappop(heap)
            if entry is not None:
                entry.sched_seq = None
        return None

    def _live(self, key: Hashable, seq: int) -> _IdleEntry | None:
        entry = self._entries.get(key)
        if entry is None or entry.sched_seq != seq:
            return None
        return entry

    def _set_state(self, key: Hashable, state: BackendLifecycle) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.state = state
        return True

    def _schedule(self, key: Hashable, entry: _IdleEntry) -> None:
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
