"""File-descriptor pressure: demote on EMFILE/ENFILE, recover after good accepts.

What this module does: a small state machine fed by the accept loop. Running
out of descriptors (EMFILE/ENFILE from ``accept``) demotes the broker: the loop
backs off briefly and keeps going, new Hellos are refused with FD_PRESSURE and a
retry-after hint, and handoffs are switched off. Three consecutive successful
accepts while demoted restore normal service. Any other accept error tells the
loop to stop. It counts demotion episodes and fd-pressure refusals for status
and metrics.

What it leaves to its caller: calling ``accept``, classifying its errors (see
:func:`classify_accept_error`), sleeping the back-off, logging the first
demotion of each episode, serving admin frames while demoted, and writing the
refusal on the wire.
"""

from __future__ import annotations

import enum
import errno
from typing import Any, Final

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

_FD_EXHAUSTION_ERRNOS: Final[frozenset[int]] = frozenset({errno.EMFILE, errno.ENFILE})


class AcceptErrorKind(enum.Enum):
    """Classification of an ``accept`` failure."""

    #: The process or system descriptor table is full (EMFILE / ENFILE).
    FD_EXHAUSTED = "fd_exhausted"
    #: Anything else.
    OTHER = "other"


def classify_accept_error(error: BaseException) -> AcceptErrorKind:
    """FD_EXHAUSTED for an :class:`OSError` with EMFILE or ENFILE, else OTHER."""
    if isinstance(error, OSError) and error.errno in _FD_EXHAUSTION_ERRNOS:
        return AcceptErrorKind.FD_EXHAUSTED
    return AcceptErrorKind.OTHER


class AcceptErrorAction(enum.Enum):
    """What the accept loop does after an error."""

    BACK_OFF_AND_CONTINUE = "back_off_and_continue"
    STOP = "stop"


@attrs.frozen
class AcceptErrorDecision:
    """The guard's answer to one accept error."""

    action: AcceptErrorAction
    #: Seconds to pause before accepting again (BACK_OFF_AND_CONTINUE only).
    backoff_s: float | None = None
    #: True when this error started a demotion episode (log it once).
    first_demotion: bool = False


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

    @property
    def exhaustion_errors(self) -> int:
        """Descriptor-exhaustion accept errors seen so far."""
        return self._exhaustion_errors

    @property
    def streak(self) -> int:
        """Consecutive successful accepts since the last exhaustion error while demoted."""
        return self._streak

    @property
    def recovery_accepts(self) -> int:
        """Successful accepts in a row needed to clear a demotion."""
        return self._recovery_accepts

    def on_accept_error(self, kind: AcceptErrorKind) -> AcceptErrorDecision:
        """React to one accept error.

        FD_EXHAUSTED demotes (or keeps demoted), resets the success streak and
        says back off and continue; OTHER says stop and changes nothing.
        """
        if kind is not AcceptErrorKind.FD_EXHAUSTED:
            return AcceptErrorDecision(AcceptErrorAction.STOP)
        self._exhaustion_errors += 1
        self._streak = 0
        first = not self._demoted
        if first:
            self._demoted = True
            self._episodes += 1
        return AcceptErrorDecision(
            AcceptErrorAction.BACK_OFF_AND_CONTINUE, self._backoff_s, first_demotion=first
        )

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

    def status(self) -> dict[str, Any]:
        """JSON-ready summary for admin status."""
        return {
            "demoted": self._demoted,
            "episodes": self._episodes,
            "refusals": self._refusals,
            "exhaustion_errors": self._exhaustion_errors,
        }
