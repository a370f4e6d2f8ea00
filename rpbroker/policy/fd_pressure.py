"""File-descriptor pressure: demote on EMFILE/ENFILE, recover after good accepts.

What this module does: a small state machine fed by the accept loop. Running
out of descriptors (EMFILE/ENFILE from ``accept``) demotes the broker: the loop
backs off briefly and keeps going, new Hellos are refused with FD_PRESSURE and a
retry-after hint, and handoffs are switched off. Three consecutive successful
accepts while demoted restore normal service. It counts demotion episodes and
fd-pressure refusals for status and metrics.

What it leaves to its caller: calling ``accept`` and recognising descriptor
exhaustion (``transports.FdExhaustedError``), sleeping the back-off, logging the
first demotion of each episode, serving admin frames while demoted, and writing
the refusal on the wire.
"""

from __future__ import annotations

from typing import Final

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s, ms_ceil
from rpbroker.policy.hello import Refusal
from rpbroker.wire.codes import RefusalCode

#: Consecutive successful accepts that clear a demotion: one success may be luck,
#: three in a row mean descriptors are available again.
DEFAULT_RECOVERY_ACCEPTS: Final[int] = 3
#: Retry hint sent with an FD_PRESSURE refusal (seconds).
DEFAULT_FD_PRESSURE_RETRY_AFTER_S: Final[float] = 1.0
#: Pause of the accept loop after a descriptor-exhaustion error (seconds), so a
#: full descriptor table does not turn the loop into a busy spin.
FD_PRESSURE_ACCEPT_BACKOFF_S: Final[float] = 0.05
#: Reason text of the FD_PRESSURE refusal.
FD_PRESSURE_REASON: Final[str] = "broker is low on file descriptors; retry shortly"


@attrs.frozen
class Demotion:
    """The guard's answer to one descriptor-exhaustion accept error."""

    #: Seconds to pause before accepting again.
    backoff_s: float
    #: True when this error started a demotion episode (log it once).
    first: bool


class FdPressureGuard:
    """Demotion state of one accept loop.

    ``recovery_accepts`` below 1 becomes 1; a non-positive ``retry_after_s`` or
    ``backoff_s`` becomes 1 ms.
    """

    __slots__ = (
        "_backoff_s",
        "_demoted",
        "_episodes",
        "_exhaustion_errors",
        "_recovery_accepts",
        "_refusals",
        "_retry_after_s",
        "_streak",
    )

    def __init__(
        self,
        recovery_accepts: int = DEFAULT_RECOVERY_ACCEPTS,
        retry_after_s: float = DEFAULT_FD_PRESSURE_RETRY_AFTER_S,
        backoff_s: float = FD_PRESSURE_ACCEPT_BACKOFF_S,
    ) -> None:
        self._recovery_accepts = clamp_count(recovery_accepts)
        self._retry_after_s = clamp_duration_s(retry_after_s)
        self._backoff_s = clamp_duration_s(backoff_s)
        self._demoted = False
        self._streak = 0
        self._episodes = 0
        self._refusals = 0
        self._exhaustion_errors = 0

    @property
    def demoted(self) -> bool:
        """True while Hellos must be refused with FD_PRESSURE."""
        return self._demoted

    @property
    def episodes(self) -> int:
        """Demotion episodes so far (healthy-to-demoted transitions)."""
        return self._episodes

    @property
    def refusals(self) -> int:
        """FD_PRESSURE refusals handed out so far."""
        return self._refusals

    def on_fd_exhausted(self) -> Demotion:
        """React to one EMFILE/ENFILE from ``accept``: demote (or stay demoted), back off.

        Resets the success streak.
        """
        self._exhaustion_errors += 1
        self._streak = 0
        first = not self._demoted
        if first:
            self._demoted = True
            self._episodes += 1
        return Demotion(self._backoff_s, first)

    def on_accept_ok(self) -> bool:
        """Count one successful accept; True when it cleared the demotion.

        Healthy: nothing happens. Demoted: the streak grows and the demotion clears
        when it reaches ``recovery_accepts``.
        """
        if not self._demoted:
            return False
        self._streak += 1
        if self._streak < self._recovery_accepts:
            return False
        self._demoted = False
        self._streak = 0
        return True

    def refusal(self) -> Refusal:
        """The FD_PRESSURE refusal for one Hello (counted)."""
        self._refusals += 1
        return Refusal(RefusalCode.FD_PRESSURE, FD_PRESSURE_REASON, ms_ceil(self._retry_after_s))
