"""Crash recovery: retry a crashed backend once, then refuse honestly.

What this module does: per backend key, counts unexpected exits in a window
(30 s by default, starting at the first crash). The first crash in a window
permits one retry after a short back-off (250 ms); a second crash in the same
window marks the backend unavailable until the window ends, and Hellos for it
should be refused with the rest of the window as their retry-after hint. A
verified-healthy backend clears the state.

What it leaves to its caller: noticing the exit, removing the dead backend from
the registry, sleeping the back-off and respawning, calling
:meth:`CrashRecovery.record_success` once the new backend is verified, and
turning :class:`MarkUnavailable` into a wire ``Refused``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final, Generic, TypeVar

import attrs

from rpbroker.policy._units import clamp_duration_s, ms_ceil

K = TypeVar("K", bound=Hashable)

#: Seconds to wait before the single retry of a crashed backend: long enough that
#: an instant crash loop does not spin, short enough to be invisible to clients.
DEFAULT_RETRY_BACKOFF_S: Final[float] = 0.25
#: Seconds during which a second crash marks the backend unavailable; the same as
#: the spawn-budget window so both policies agree on "recently".
DEFAULT_RECOVERY_WINDOW_S: Final[float] = 30.0


@attrs.frozen
class RetryAfterBackoff:
    """Decision: respawn the backend once, after ``delay_s`` seconds."""

    delay_s: float
    #: 1-based retry number within the window (always 1: one retry per window).
    attempt: int = 1


@attrs.frozen
class MarkUnavailable:
    """Decision: do not respawn; refuse Hellos for ``retry_after_s`` seconds."""

    retry_after_s: float

    @property
    def retry_after_ms(self) -> int:
        """The hint in whole milliseconds, rounded up, at least 1."""
        return max(1, ms_ceil(self.retry_after_s))


RecoveryDecision = RetryAfterBackoff | MarkUnavailable


@attrs.define
class _CrashWindow:
    started_at: float
    crashes: int


class CrashRecovery(Generic[K]):
    """Per-key crash windows. Non-positive durations become 1 ms."""

    __slots__ = ("_backoff_s", "_window_s", "_windows")

    def __init__(
        self,
        backoff_s: float = DEFAULT_RETRY_BACKOFF_S,
        window_s: float = DEFAULT_RECOVERY_WINDOW_S,
    ) -> None:
        self._backoff_s = clamp_duration_s(backoff_s)
        self._window_s = clamp_duration_s(window_s)
        self._windows: dict[K, _CrashWindow] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def record_crash(self, key: K, now: float) -> RecoveryDecision:
        """Count one unexpected exit of ``key``'s backend and decide what to do.

        First crash in the window: :class:`RetryAfterBackoff`. Any later crash in
        the same window: :class:`MarkUnavailable` for the rest of the window. A
        crash ``window_s`` or more after the window started opens a new window.
        """
        window = self._current(key, now)
        if window is None:
            window = _CrashWindow(started_at=now, crashes=0)
            self._windows[key] = window
        window.crashes += 1
        if window.crashes == 1:
            return RetryAfterBackoff(self._backoff_s, attempt=1)
        return MarkUnavailable(self._remaining(window, now))

    def record_success(self, key: K) -> None:
        """Forget ``key``'s crashes once its backend is verified healthy."""
        self._windows.pop(key, None)

    def unavailable(self, key: K, now: float) -> MarkUnavailable | None:
        """Whether Hellos for ``key`` must be refused now, and for how long.

        Refusing lasts until the end of the window that saw the second crash.
        """
        window = self._current(key, now)
        if window is None or window.crashes < 2:
            return None
        return MarkUnavailable(self._remaining(window, now))

    def crashes_in_window(self, key: K, now: float) -> int:
        """Crashes counted in ``key``'s current window (0 when none is open)."""
        window = self._current(key, now)
        return 0 if window is None else window.crashes

    def _current(self, key: K, now: float) -> _CrashWindow | None:
        window = self._windows.get(key)
        if window is None:
            return None
        if now - window.started_at >= self._window_s:
            del self._windows[key]
            return None
        return window

    def _remaining(self, window: _CrashWindow, now: float) -> float:
        elapsed = max(0.0, now - window.started_at)
        return max(0.0, self._window_s - elapsed)
