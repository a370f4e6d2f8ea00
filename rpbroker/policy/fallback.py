"""Whether to attempt a connection handoff, and the failed-attempt rate limit.

What this module does: decides, per request, between attempting a handoff and
falling back silently to the reconnect route, for one of eight typed reasons;
and counts failed attempts per backend (at most 8 in a 30 s window by default),
suppressing attempts once the budget is spent until the window ends. A fallback
is never a client error: the client always gets the reconnect route.

What it leaves to its caller: producing the inputs (client opt-in, service
policy, fd pressure, adopted backend), reading the clock, calling
:meth:`FallbackState.record_failure` / :meth:`FallbackState.record_success`
after each attempt, and carrying the chosen route on the wire.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s

#: Failed handoff attempts per backend before attempts are suppressed.
DEFAULT_MAX_FAILED_ATTEMPTS: Final[int] = 8
#: Seconds over which failed attempts are counted (window starts at the first failure).
DEFAULT_FAILED_ATTEMPT_WINDOW_S: Final[float] = 30.0


class FallbackReason(enum.Enum):
    """Why a request uses the reconnect route instead of a handoff."""

    CLIENT_UNSUPPORTED = "client_unsupported"
    SERVICE_POLICY_DISABLED = "service_policy_disabled"
    FD_PRESSURE_DISABLED = "fd_pressure_disabled"
    ADOPTED_BACKEND = "adopted_backend"
    FAILED_ATTEMPT_RATE_LIMITED = "failed_attempt_rate_limited"
    PERMISSION_DENIED = "permission_denied"
    INTEGRITY_MISMATCH = "integrity_mismatch"
    BACKEND_ACK_TIMEOUT = "backend_ack_timeout"


@attrs.frozen
class HandoffInputs:
    """Facts about one request that gate a handoff attempt."""

    #: The client advertised (and will honour) handle passing.
    client_opted_in: bool
    #: The service definition allows the handoff optimisation.
    service_allows: bool
    #: The broker is under fd pressure (handoff temporarily off).
    fd_pressure: bool
    #: The backend was adopted from an earlier broker rather than spawned by this one.
    backend_adopted: bool = False

    @classmethod
    def enabled(cls) -> HandoffInputs:
        """Inputs of the common case where everything permits a handoff."""
        return cls(client_opted_in=True, service_allows=True, fd_pressure=False)


@attrs.frozen
class Attempt:
    """Decision: the broker may attempt the platform handoff."""

    @property
    def uses_backend_reconnect(self) -> bool:
        """False: the attempt itself is not the reconnect route."""
        return False

    @property
    def sends_client_error(self) -> bool:
        """False: attempting is never a client error."""
        return False


#: The one :class:`Attempt` value; ``Attempt()`` compares equal to it.
ATTEMPT: Final[Attempt] = Attempt()


@attrs.frozen
class Fallback:
    """Decision: reply with the backend endpoint and let the client reconnect."""

    reason: FallbackReason
    #: Seconds until handoff attempts may resume for this backend (rate limit only).
    retry_after_s: float | None = None

    @property
    def uses_backend_reconnect(self) -> bool:
        """Always True: a fallback always sends the reconnect route."""
        return True

    @property
    def sends_client_error(self) -> bool:
        """Always False: a failed optimisation is not a client error."""
        return False


HandoffDecision = Attempt | Fallback


@attrs.frozen
class FallbackPolicy:
    """Failed-attempt budget. A count below 1 becomes 1; a non-positive window 1 ms."""

    max_failed_attempts: int = attrs.field(
        default=DEFAULT_MAX_FAILED_ATTEMPTS, converter=clamp_count
    )
    window_s: float = attrs.field(
        default=DEFAULT_FAILED_ATTEMPT_WINDOW_S, converter=clamp_duration_s
    )


@attrs.define
class _FailureWindow:
    started_at: float
    count: int


class FallbackState:
    """Per-backend failed-attempt windows and the ``should_attempt`` decision.

    Keys are any hashable backend identity. Every operation is O(1) amortised:
    windows live in an insertion-ordered dict that is re-ordered when a window
    restarts, so windows that have run out are dropped from its front as new
    failures arrive and memory stays proportional to recently failing backends.
    (An ``OrderedDict``, whose front is O(1) to reach however many entries were
    removed before it, unlike a plain dict.)
    """

    __slots__ = ("_policy", "_windows")

    def __init__(self, policy: FallbackPolicy | None = None) -> None:
        self._policy = policy if policy is not None else FallbackPolicy()
        self._windows: OrderedDict[Hashable, _FailureWindow] = OrderedDict()

    @property
    def policy(self) -> FallbackPolicy:
        """The active policy."""
        return self._policy

    def __len__(self) -> int:
        """Backends with a tracked failure window (including run-out ones not yet dropped)."""
        return len(self._windows)

    def should_attempt(self, key: Hashable, inputs: HandoffInputs, now: float) -> HandoffDecision:
        """Decide for one request, checking in this order.

        client not opted in, service disabled, fd pressure, adopted backend, failed
        attempts at the limit (``retry_after_s`` = rest of the window); otherwise
        :data:`ATTEMPT`.
        """
        if not inputs.client_opted_in:
            return Fallback(FallbackReason.CLIENT_UNSUPPORTED)
        if not inputs.service_allows:
            return Fallback(FallbackReason.SERVICE_POLICY_DISABLED)
        if inputs.fd_pressure:
            return Fallback(FallbackReason.FD_PRESSURE_DISABLED)
        if inputs.backend_adopted:
            return Fallback(FallbackReason.ADOPTED_BACKEND)
        window = self._current(key, now)
        if window is None or window.count < self._policy.max_failed_attempts:
            return ATTEMPT
        elapsed = max(0.0, now - window.started_at)
        return Fallback(
            FallbackReason.FAILED_ATTEMPT_RATE_LIMITED,
            retry_after_s=max(0.0, self._policy.window_s - elapsed),
        )

    def record_failure(self, key: Hashable, now: float) -> int:
        """Count one failed attempt for ``key``; returns the (capped) count in the window.

        The window starts at the first failure and restarts when a failure arrives
        ``window_s`` or more after it started. The count never exceeds
        ``max_failed_attempts``.
        """
        self._drop_run_out(now)
        window = self._current(key, now)
        if window is None:
            window = _FailureWindow(started_at=now, count=0)
            self._windows[key] = window
        window.count = min(window.count + 1, self._policy.max_failed_attempts)
        return window.count

    def record_success(self, key: Hashable) -> None:
        """Forget ``key``'s failures after a successful handoff."""
        self._windows.pop(key, None)

    def failed_count(self, key: Hashable, now: float) -> int:
        """Failed attempts counted for ``key`` in the window current at ``now``."""
        window = self._current(key, now)
        return 0 if window is None else window.count

    def _current(self, key: Hashable, now: float) -> _FailureWindow | None:
        window = self._windows.get(key)
        if window is None:
            return None
        if now - window.started_at >= self._policy.window_s:
            # The window ran out: a run-out window is the same as no window.
            del self._windows[key]
            return None
        return window

    def _drop_run_out(self, now: float) -> None:
        # Windows are created in time order, so run-out ones cluster at the front.
        # Each window is dropped at most once, which keeps this O(1) amortised.
        windows = self._windows
        while windows:
            first_key = next(iter(windows))
            if now - windows[first_key].started_at < self._policy.window_s:
                break
            windows.popitem(last=False)
