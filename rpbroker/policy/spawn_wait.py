"""Spawn wait: when to check a freshly spawned foreign backend for readiness again.

What this module does: a pure schedule for the readiness checks of a backend that
has no control channel to report ready on (a foreign backend, checked by an
endpoint probe or a connect). Given how many checks have failed so far, the time
now and the spawn's ready deadline, :meth:`ReadinessBackoff.next_check_at` says
when to check next: fast at first (most backends bind within milliseconds), then
backing off to a cap, never later than the deadline, so the last check happens
at the ceiling rather than a back-off step before it.

What it does not do: decide that a spawn failed. The backend's lifecycle
(``rpbroker.policy.lifecycle``) owns that: its ready timer ends STARTING, its
process exit before ready is a spawn failure, and a failed check is only an input
(``ReadinessCheckFailed``) it remembers for the failure's detail. Checking the
endpoint and sleeping are the shell's (``rpbroker.supervisor.incarnation``).
"""

from __future__ import annotations

from typing import Final

import attrs

from rpbroker.policy._units import clamp_duration_s

#: Delays between readiness checks, seconds: fast at first, since most backends are
#: ready within milliseconds, then backing off to the last step (the cap), so a slow
#: backend costs at most one check every 2 s.
DEFAULT_SPAWN_WAIT_BACKOFF_S: Final[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _clamp_backoff(values: tuple[float, ...]) -> tuple[float, ...]:
    steps = tuple(clamp_duration_s(v) for v in values)
    if not steps:
        raise ValueError("spawn-wait backoff needs at least one step")
    return steps


@attrs.frozen
class ReadinessBackoff:
    """Back-off steps between readiness checks (seconds). Non-positive steps become 1 ms.

    Check numbers past the end of ``steps`` reuse its last step (the cap).
    """

    steps: tuple[float, ...] = attrs.field(
        default=DEFAULT_SPAWN_WAIT_BACKOFF_S, converter=_clamp_backoff
    )

    def step_after(self, failed_checks: int) -> float:
        """The delay after ``failed_checks`` failed checks (1-based; capped at the last step)."""
        index = min(max(0, failed_checks - 1), len(self.steps) - 1)
        return self.steps[index]

    def next_check_at(self, failed_checks: int, now: float, deadline: float) -> float:
        """When to check again: the back-off step from ``now``, never past ``deadline``."""
        return min(now + self.step_after(failed_checks), max(now, deadline))
