"""Spawn wait: how long to keep polling a freshly spawned backend for readiness.

What this module does: a pure decision for one readiness probe. Given the time
since spawn, whether the process is still alive, whether its endpoint answered
and the probe number, it says: ready (this wins over everything), the daemon
exited before becoming ready, the hard ceiling (60 s) was reached, or sleep for
the next back-off step (50 ms, 100 ms, 200 ms, 500 ms, 1 s, then 2 s) without
sleeping past the ceiling.

What it leaves to its caller: probing the endpoint and the process, sleeping,
counting probes and turning the terminal outcomes into a spawn failure.
"""

from __future__ import annotations

from typing import Final

import attrs

from rpbroker.policy._units import clamp_duration_s

#: Hard bound on a readiness wait (seconds): a backend slower than this is broken.
DEFAULT_SPAWN_WAIT_CEILING_S: Final[float] = 60.0
#: Delays between readiness probes (seconds): fast at first, since most backends
#: are ready within milliseconds, then backing off to the last step.
DEFAULT_SPAWN_WAIT_BACKOFF_S: Final[tuple[float, ...]] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@attrs.frozen
class EndpointReady:
    """Decision: the backend answered; stop waiting."""


@attrs.frozen
class DaemonExitedBeforeReady:
    """Decision: the process died before its endpoint answered."""


@attrs.frozen
class SpawnWaitTimeout:
    """Decision: the hard ceiling was reached."""

    ceiling_s: float


@attrs.frozen
class SleepFor:
    """Decision: probe again after ``delay_s`` seconds."""

    delay_s: float


SpawnWaitDecision = EndpointReady | DaemonExitedBeforeReady | SpawnWaitTimeout | SleepFor


def _clamp_backoff(values: tuple[float, ...]) -> tuple[float, ...]:
    steps = tuple(clamp_duration_s(v) for v in values)
    if not steps:
        raise ValueError("spawn-wait backoff needs at least one step")
    return steps


@attrs.frozen
class SpawnWaitPolicy:
    """Ceiling and back-off steps (seconds). Non-positive values become 1 ms.

    Probe numbers past the end of ``backoff`` reuse its last step (the cap).
    """

    ceiling_s: float = attrs.field(default=DEFAULT_SPAWN_WAIT_CEILING_S, converter=clamp_duration_s)
    backoff: tuple[float, ...] = attrs.field(
        default=DEFAULT_SPAWN_WAIT_BACKOFF_S, converter=_clamp_backoff
    )

    def backoff_for(self, attempt: int) -> float:
        """The back-off step for 0-based probe number ``attempt`` (capped at the last)."""
        index = min(max(0, attempt), len(self.backoff) - 1)
        return self.backoff[index]

    def decide(
        self, elapsed_s: float, daemon_alive: bool, endpoint_ready: bool, attempt: int
    ) -> SpawnWaitDecision:
        """Decide after probe ``attempt`` (0-based), ``elapsed_s`` seconds after spawn.

        Checked in order: endpoint ready; daemon gone; ``elapsed_s >= ceiling_s``;
        otherwise sleep ``min(backoff step, ceiling_s - elapsed_s)``.
        """
        if endpoint_ready:
            return EndpointReady()
        if not daemon_alive:
            return DaemonExitedBeforeReady()
        if elapsed_s >= self.ceiling_s:
            return SpawnWaitTimeout(self.ceiling_s)
        return SleepFor(min(self.backoff_for(attempt), self.ceiling_s - elapsed_s))
