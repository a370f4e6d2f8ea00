"""Spawn budget: at most N spawn attempts per key per window, one at a time.

What this module does: per backend key, allows at most ``max_attempts`` spawns
(3 by default) in a window (30 s, starting at the first attempt), and at most
one in flight. An exhausted budget reports the rest of the window as its
retry-after and flags the first exhausted observation of a window as a "storm
trip" (so the caller can react once per storm). A success resets the window; a
failure leaves the attempt counted; rolling over into a new window also clears
an in-flight flag that was never finished (a stuck spawn cannot block a key
forever).

What it leaves to its caller: the single-flight waiting (the trio shell makes
concurrent Hellos for one key wait on one spawn), running the spawn, always
calling :meth:`SpawnBudget.finish`, and mapping the refusals onto the wire
("backend spawn already in progress", "backend spawn budget exhausted").
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s, ms_ceil

K = TypeVar("K", bound=Hashable)

#: Spawn attempts allowed per key per window: a backend that fails this often is
#: broken, and respawning it faster only burns CPU.
DEFAULT_SPAWN_ATTEMPTS: Final[int] = 3
#: Seconds in one spawn-budget window (starts at the first attempt).
DEFAULT_SPAWN_WINDOW_S: Final[float] = 30.0


class SpawnOutcome(enum.Enum):
    """How a permitted spawn ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


@attrs.frozen
class SpawnPermit:
    """Decision: spawn now. The caller must call :meth:`SpawnBudget.finish`."""

    #: 1-based attempt number within the window.
    attempt_number: int
    #: Attempts left in the window after this one.
    remaining: int


@attrs.frozen
class SpawnInProgress:
    """Decision: a spawn for this key is already in flight."""


#: The one :class:`SpawnInProgress` value.
SPAWN_IN_PROGRESS: Final[SpawnInProgress] = SpawnInProgress()


@attrs.frozen
class BudgetExhausted:
    """Decision: no attempts left until the window ends."""

    #: Seconds until the window ends.
    retry_after_s: float
    #: True only for the first exhausted observation in a window.
    storm_trip: bool

    @property
    def retry_after_ms(self) -> int:
        """The hint in whole milliseconds, rounded up, at least 1."""
        return max(1, ms_ceil(self.retry_after_s))


SpawnDecision = SpawnPermit | SpawnInProgress | BudgetExhausted


@attrs.frozen
class BudgetSnapshot:
    """A read-only view of one key's budget."""

    attempts_used: int
    remaining: int
    in_flight: bool
    #: Seconds until the window ends; set only when ``remaining == 0``.
    retry_after_s: float | None


@attrs.define
class _BudgetWindow:
    started_at: float
    attempts_used: int = 0
    in_flight: bool = False
    storm_signaled: bool = False


class SpawnBudget(Generic[K]):
    """Per-key spawn windows. A count below 1 becomes 1; a non-positive window 1 ms."""

    __slots__ = ("_max_attempts", "_window_s", "_windows")

    def __init__(
        self,
        max_attempts: int = DEFAULT_SPAWN_ATTEMPTS,
        window_s: float = DEFAULT_SPAWN_WINDOW_S,
    ) -> None:
        self._max_attempts = clamp_count(max_attempts)
        self._window_s = clamp_duration_s(window_s)
        self._windows: dict[K, _BudgetWindow] = {}

    def keys(self) -> list[K]:
        """Keys with budget state, in first-seen order."""
        return list(self._windows)

    def try_begin(self, key: K, now: float) -> SpawnDecision:
        """Ask to start a spawn for ``key``.

        In order: roll the window over if it ran out; in flight gives
        :data:`SPAWN_IN_PROGRESS`; no attempts left gives :class:`BudgetExhausted`;
        otherwise the attempt is counted, marked in flight and permitted.
        """
        window = self._refreshed(key, now)
        if window.in_flight:
            return SPAWN_IN_PROGRESS
        if window.attempts_used >= self._max_attempts:
            storm_trip = not window.storm_signaled
            window.storm_signaled = True
            return BudgetExhausted(self._remaining_s(window, now), storm_trip)
        window.attempts_used += 1
        window.in_flight = True
        return SpawnPermit(window.attempts_used, self._max_attempts - window.attempts_used)

    def finish(self, key: K, outcome: SpawnOutcome, now: float) -> None:
        """Report how a permitted spawn ended.

        Clears the in-flight flag. SUCCEEDED restarts the window at ``now`` with no
        attempts used; FAILED leaves the attempt counted. Unknown keys are ignored.
        """
        if key not in self._windows:
            return
        window = self._refreshed(key, now)
        window.in_flight = False
        if outcome is SpawnOutcome.SUCCEEDED:
            window.started_at = now
            window.attempts_used = 0
            window.storm_signaled = False

    def snapshot(self, key: K, now: float) -> BudgetSnapshot:
        """Describe ``key``'s budget at ``now`` without changing it."""
        window = self._windows.get(key)
        if window is None or now - window.started_at >= self._window_s:
            return BudgetSnapshot(0, self._max_attempts, in_flight=False, retry_after_s=None)
        remaining = max(0, self._max_attempts - window.attempts_used)
        return BudgetSnapshot(
            window.attempts_used,
            remaining,
            window.in_flight,
            self._remaining_s(window, now) if remaining == 0 else None,
        )

    def count_attempt(self, key: K, now: float) -> None:
        """Count one attempt for ``key`` without marking it in flight (a cap over keys)."""
        self._refreshed(key, now).attempts_used += 1

    def _refreshed(self, key: K, now: float) -> _BudgetWindow:
        window = self._windows.get(key)
        if window is None:
            window = _BudgetWindow(started_at=now)
            self._windows[key] = window
        elif now - window.started_at >= self._window_s:
            # Roll over: a fresh budget, and a stuck in-flight flag is cleared.
            window.started_at = now
            window.attempts_used = 0
            window.in_flight = False
            window.storm_signaled = False
        return window

    def _remaining_s(self, window: _BudgetWindow, now: float) -> float:
        elapsed = max(0.0, now - window.started_at)
        return max(0.0, self._window_s - elapsed)


#: Spawn attempts allowed per service across all its versions per window: twice the
#: per-key budget, so two versions can each use theirs, while a crash-at-start
#: service asked for many versions cannot multiply its spawns by the version count.
DEFAULT_SERVICE_SPAWN_ATTEMPTS: Final[int] = 2 * DEFAULT_SPAWN_ATTEMPTS

S = TypeVar("S", bound=Hashable)


class SpawnLimiter(Generic[K, S]):
    """The per-key budget (the reference's) under a per-service cap across keys.

    ``try_begin(key, service, now)`` permits a spawn only when both allow it: the
    key's :class:`SpawnBudget` (single flight, N per window) and the service's
    cap (M attempts per window over every key of the service, no single flight).
    ``finish`` reports to both; a success resets both windows.
    """

    __slots__ = ("_keys", "_services")

    def __init__(
        self,
        max_attempts: int = DEFAULT_SPAWN_ATTEMPTS,
        window_s: float = DEFAULT_SPAWN_WINDOW_S,
        max_service_attempts: int = DEFAULT_SERVICE_SPAWN_ATTEMPTS,
    ) -> None:
        self._keys: SpawnBudget[K] = SpawnBudget(max_attempts, window_s)
        self._services: SpawnBudget[S] = SpawnBudget(max_service_attempts, window_s)

    @property
    def keys(self) -> SpawnBudget[K]:
        """The per-key budget (read it with ``snapshot``; do not drive it directly)."""
        return self._keys

    def try_begin(self, key: K, service: S, now: float) -> SpawnDecision:
        """Ask to start a spawn for ``key`` of ``service``; see :meth:`SpawnBudget.try_begin`.

        The service cap is checked first without spending anything, so a refusal
        by either leaves both budgets as they were.
        """
        cap = self._services.snapshot(service, now)
        if cap.remaining == 0:
            return self._services.try_begin(service, now)  # exhausted: report its window
        decision = self._keys.try_begin(key, now)
        if isinstance(decision, SpawnPermit):
            self._services.count_attempt(service, now)
        return decision

    def finish(self, key: K, service: S, outcome: SpawnOutcome, now: float) -> None:
        """Report how a permitted spawn ended to both budgets."""
        self._keys.finish(key, outcome, now)
        if outcome is SpawnOutcome.SUCCEEDED:
            self._services.finish(service, outcome, now)
