"""Shared clamping and unit helpers for the policy core.

What this module does: the two clamping rules every seed applies to its
configuration (a count below 1 becomes 1; a duration that is zero, negative or
NaN becomes 1 ms) and the seconds-to-milliseconds rounding used for
``retry_after_ms`` hints.

What it leaves to its callers: choosing defaults and deciding which values are
clamped; it never reads a clock.
"""

from __future__ import annotations

import math
from typing import Final

#: Smallest duration any policy accepts, in seconds (1 ms). The reference turns a
#: zero duration into 1 ms so every window, deadline and timeout is non-empty.
MIN_DURATION_S: Final[float] = 0.001


def clamp_duration_s(value: float) -> float:
    """Return ``value`` seconds, or :data:`MIN_DURATION_S` when it is not positive.

    NaN is treated as "not positive" as well, so a corrupt configuration value
    can never produce a window that compares false against every ``now``.
    """
    value = float(value)
    if not value > 0.0:
        return MIN_DURATION_S
    return value


def clamp_count(value: int) -> int:
    """Return ``value``, raised to at least 1."""
    return max(1, int(value))


def ms_ceil(seconds: float) -> int:
    """Convert a non-negative duration in seconds to whole milliseconds, rounding up.

    Rounding up means a client that waits the advertised hint is past the
    boundary, never a fraction of a millisecond short of it. The product is first
    rounded to a nanosecond so float noise (``0.3 * 1000 == 300.00000000000006``)
    does not add a spurious millisecond. Negative input gives 0.
    """
    if not seconds > 0.0:
        return 0
    return math.ceil(round(seconds * 1000.0, 6))
