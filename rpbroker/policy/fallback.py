"""Whether to attempt a connection handoff, and the failed-attempt rate limit.

What this module does: decides, per request, between attempting a handoff and
falling back silently to the reconnect route, for a typed reason; and counts
failed attempts per backend (at most 8 in a 30 s window by default), suppressing
attempts once the budget is spent until the window ends. Attempts in flight are
tracked so that, once a backend fails, outcomes not in yet cannot overrun the
budget. A fallback is never a client error: the client always gets the
reconnect route.

What it leaves to its caller: producing the inputs (client opt-in, service
policy, fd pressure, adopted backend), reading the clock, calling
:meth:`FallbackState.attempt_started` and :meth:`FallbackState.attempt_ended`
around each attempt (the latter the moment the result is known), and carrying
the chosen route on the wire.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s

K = TypeVar("K", bound=Hashable)

#: Failed handoff attempts per backend before attempts are suppressed.
DEFAULT_MAX_FAILED_ATTEMPTS: Final[int] = 8
#: Seconds over which failed attempts are counted (window starts at the first failure).
DEFAULT_FAILED_ATTEMPT_WINDOW_S: Final[float] = 30.0


class FallbackReason(enum.Enum):
    """Why a request uses the reconnect route instead of a handoff (decided before any attempt).

    The values are the reference's decision reasons. What went wrong *during* an
    attempt is a separate, finer value (``rpbroker.handoff.AttemptFailure``).
    """

    CLIENT_UNSUPPORTED = "client_unsupported"
    SERVICE_POLICY_DISABLED = "service_policy_disabled"
    FD_PRESSURE_DISABLED = "fd_pressure_disabled"
    ADOPTED_BACKEND = "adopted_backend"
    FAILED_ATTEMPT_RATE_LIMITED = "failed_attempt_rate_limited"
    PERMISSION_DENIED = "permission_denied"
    INTEGRITY_MISMATCH = "integrity_mismatch"
    BACKEND_ACK_TIMEOUT = "backend_ack_timeout"
    #: The broker could not issue a token (store full): a silent downgrade.
    TOKEN_UNAVAILABLE = "token_unavailable"
    #: The backend has no control channel to pass a connection on (a foreign backend,
    #: not an rpbroker SDK process). Not a reference reason: the reference has none.
    NO_CONTROL_CHANNEL = "backend_no_control_channel"


class AttemptResult(enum.Enum):
    """How one handoff attempt ended, as far as the failed-attempt budget cares."""

    #: The backend adopted and acknowledged in time: clears the backend's failures.
    SUCCEEDED = "succeeded"
    #: The backend (or the path to it) failed: counts against its budget.
    FAILED = "failed"
    #: Given up for a reason that is not the backend's (client gone, broker
    #: stopping, cancelled): counts neither way.
    ABANDONED = "abandoned"


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
    #: The backend has a control channel (false for a foreign backend).
    backend_has_control_channel: bool = True


@attrs.frozen
class Attempt:
    """Decision: the broker may attempt the platform handoff."""


@attrs.frozen
class Fallback:
    """Decision: reply with the backend endpoint and let the client reconnect."""

    reason: FallbackReason
    #: Seconds until handoff attempts may resume for this backend (rate limit only).
    retry_after_s: float | None = None


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
    failures: int


class FallbackState(Generic[K]):
    """Per-backend failed-attempt windows, attempts in flight, and ``should_attempt``.

    The budget counts an attempt against its backend at the moment its failure is
    known (``attempt_ended(..., FAILED)``), and, while the backend has a failure
    in its window, every attempt still in flight counts as a potential failure
    too. So once a backend has started failing, the budget can never be overrun
    by attempts whose outcomes are not in yet (a client that fell back retries
    before the broker has read its backend's rejection, say), while a healthy
    backend is never limited however many handoffs are in flight.

    Every operation is O(1) amortised: failure windows live in an
    insertion-ordered dict re-ordered when a window restarts, so windows that ran
    out are dropped from its front; attempts in flight are counted in a separate
    dict that holds only backends with attempts under way. Memory stays
    proportional to recently failing backends plus those with attempts in flight.
    """

    __slots__ = ("_in_flight", "_policy", "_windows")

    def __init__(self, policy: FallbackPolicy | None = None) -> None:
        self._policy = policy if policy is not None else FallbackPolicy()
        self._windows: OrderedDict[K, _FailureWindow] = OrderedDict()
        self._in_flight: dict[K, int] = {}

    @property
    def policy(self) -> FallbackPolicy:
        """The active policy."""
        return self._policy

    def __len__(self) -> int:
        """Backends tracked (a failure window or an attempt in flight)."""
        return len(self._windows.keys() | self._in_flight.keys())

    def should_attempt(self, key: K, inputs: HandoffInputs, now: float) -> HandoffDecision:
        """Decide for one request, checking in this order.

        client not opted in, backend without a control channel, service disabled,
        fd pressure, adopted backend,
        failed attempts (plus attempts in flight, once failing) at the limit
        (``retry_after_s`` = rest of the window); otherwise :class:`Attempt`.
        """
        if not inputs.client_opted_in:
            return Fallback(FallbackReason.CLIENT_UNSUPPORTED)
        if not inputs.backend_has_control_channel:
            return Fallback(FallbackReason.NO_CONTROL_CHANNEL)
        if not inputs.service_allows:
            return Fallback(FallbackReason.SERVICE_POLICY_DISABLED)
        if inputs.fd_pressure:
            return Fallback(FallbackReason.FD_PRESSURE_DISABLED)
        if inputs.backend_adopted:
            return Fallback(FallbackReason.ADOPTED_BACKEND)
        window = self._current(key, now)
        if window is None:
            return Attempt()
        if window.failures + self._in_flight.get(key, 0) < self._policy.max_failed_attempts:
            return Attempt()
        elapsed = max(0.0, now - window.started_at)
        return Fallback(
            FallbackReason.FAILED_ATTEMPT_RATE_LIMITED,
            retry_after_s=max(0.0, self._policy.window_s - elapsed),
        )

    def attempt_started(self, key: K) -> None:
        """An attempt for ``key`` begins; it is in flight until ``attempt_ended``."""
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def attempt_ended(self, key: K, result: AttemptResult, now: float) -> None:
        """An attempt for ``key`` ended with ``result``.

        FAILED counts one failure (capped at the limit); the window starts at the
        first failure and restarts when a failure arrives ``window_s`` or more
        after it started. SUCCEEDED forgets the failures. ABANDONED changes only
        the in-flight count.
        """
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        self._drop_run_out(now)
        if result is AttemptResult.SUCCEEDED:
            self._windows.pop(key, None)
        elif result is AttemptResult.FAILED:
            window = self._current(key, now)
            if window is None:
                window = self._windows[key] = _FailureWindow(started_at=now, failures=0)
            window.failures = min(window.failures + 1, self._policy.max_failed_attempts)

    def _current(self, key: K, now: float) -> _FailureWindow | None:
        window = self._windows.get(key)
        if window is None:
            return None
        if now - window.started_at >= self._policy.window_s:
            # The window ran out: a run-out window is the same as no failures.
            del self._windows[key]
            return None
        return window

    def _drop_run_out(self, now: float) -> None:
        # Windows are created in time order, so run-out ones cluster at the front;
        # each is dropped at most once, which keeps this O(1) amortised.
        windows = self._windows
        while windows:
            first_key = next(iter(windows))
            if now - windows[first_key].started_at < self._policy.window_s:
                break
            windows.popitem(last=False)
