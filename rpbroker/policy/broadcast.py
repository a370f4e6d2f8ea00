"""Lifecycle broadcast: operations, per-backend outcomes and the collected result.

What this module does: names the two lifecycle operations the broker fans out
to its backends (release handles under a path prefix; quiesce, with a reason),
the five things that can happen to each backend (acknowledged, timed out,
failed, skipped because it was dead, skipped because it has no control
channel), and the result of one broadcast with JSON-ready output.
:class:`BroadcastCollector` is what the live fan-out feeds as
answers arrive.

What it leaves to its caller: sending the operation to each live backend
concurrently, bounding each wait by the ACK timeout (for example
``trio.move_on_at``), deciding which backends are alive, and recording each
answer in the collector.

Backend identities are any hashable value. In JSON output a backend is shown
through its own ``to_json()`` method when it has one, as itself when it is a
``str``, ``int`` or ``float``, and otherwise as ``str(backend)``.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from typing import Any, Final, Generic, TypeVar

import attrs

from rpbroker.policy._units import clamp_duration_s

B = TypeVar("B", bound=Hashable)

#: Seconds each backend has to acknowledge one broadcast; a backend that needs
#: longer to release handles or begin draining is reported as timed out.
DEFAULT_BROADCAST_ACK_TIMEOUT_S: Final[float] = 5.0


class QuiesceReason(enum.Enum):
    """Why the broker asks a backend to stop accepting work and drain."""

    IDLE_TIMEOUT = "idle_timeout"
    BROKER_SHUTDOWN = "broker_shutdown"
    MAINTENANCE = "maintenance"


@attrs.frozen
class ReleaseHandles:
    """Ask backends to release file handles below ``path_prefix``."""

    path_prefix: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"op": "release_handles", "path_prefix": self.path_prefix}


@attrs.frozen
class Quiesce:
    """Ask backends to stop accepting new work, drain and exit."""

    reason: QuiesceReason

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"op": "quiesce", "reason": self.reason.value}


BroadcastOperation = ReleaseHandles | Quiesce


class BroadcastFailure(enum.Enum):
    """Why a live backend failed a broadcast."""

    UNSUPPORTED_OPERATION = "unsupported_operation"
    REJECTED = "rejected"
    BACKEND_ERROR = "backend_error"

    @property
    def default_detail(self) -> str:
        """A generic human-readable detail for this failure."""
        return _FAILURE_DETAILS[self]


_FAILURE_DETAILS: Final[dict[BroadcastFailure, str]] = {
    BroadcastFailure.UNSUPPORTED_OPERATION: "backend does not support this lifecycle operation",
    BroadcastFailure.REJECTED: "backend rejected the lifecycle operation",
    BroadcastFailure.BACKEND_ERROR: "backend failed while handling the lifecycle operation",
}


@attrs.frozen
class BackendAcked(Generic[B]):
    """The backend acknowledged the operation."""

    backend: B


@attrs.frozen
class BackendTimedOut(Generic[B]):
    """The backend did not answer within ``timeout_s`` seconds."""

    backend: B
    timeout_s: float


@attrs.frozen
class BackendFailed(Generic[B]):
    """The backend answered with a failure."""

    backend: B
    failure: BroadcastFailure
    detail: str = ""


@attrs.frozen
class BackendSkippedDead(Generic[B]):
    """The backend was dead; nothing was sent to it."""

    backend: B


@attrs.frozen
class BackendSkippedNoControl(Generic[B]):
    """The backend is alive but has no control channel (a foreign backend): nothing was sent.

    ``detail`` says what the broker did instead (a quiesce becomes SIGTERM, with
    SIGKILL at the drain deadline; handles cannot be released on request).
    """

    backend: B
    detail: str


BroadcastOutcome = (
    BackendAcked[B]
    | BackendTimedOut[B]
    | BackendFailed[B]
    | BackendSkippedDead[B]
    | BackendSkippedNoControl[B]
)


def _backend_json(backend: Hashable) -> Any:
    """JSON-ready form of a backend identity (see the module docstring)."""
    to_json = getattr(backend, "to_json", None)
    if callable(to_json):
        return to_json()
    if isinstance(backend, str | int | float) and not isinstance(backend, bool):
        return backend
    return str(backend)


@attrs.frozen
class BroadcastResult(Generic[B]):
    """Outcome of one broadcast, each list in backend registration order."""

    operation: BroadcastOperation
    acks: tuple[BackendAcked[B], ...] = ()
    timeouts: tuple[BackendTimedOut[B], ...] = ()
    failures: tuple[BackendFailed[B], ...] = ()
    skipped_dead: tuple[BackendSkippedDead[B], ...] = ()
    skipped_no_control: tuple[BackendSkippedNoControl[B], ...] = ()

    @property
    def sent_count(self) -> int:
        """Live backends the operation was sent to."""
        return len(self.acks) + len(self.timeouts) + len(self.failures)

    @property
    def all_live_backends_acked(self) -> bool:
        """True when no live backend timed out, failed or could not be asked (vacuous with none).

        A live backend without a control channel never acknowledges, so it makes
        this false: the operation did not reach every live backend.
        """
        return not self.timeouts and not self.failures and not self.skipped_no_control

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (only str, int, float, bool, None, lists and dicts)."""
        return {
            "operation": self.operation.to_json(),
            "sent_count": self.sent_count,
            "all_live_backends_acked": self.all_live_backends_acked,
            "acks": [_backend_json(o.backend) for o in self.acks],
            "timeouts": [
                {"backend": _backend_json(o.backend), "timeout_ms": round(o.timeout_s * 1000)}
                for o in self.timeouts
            ],
            "failures": [
                {
                    "backend": _backend_json(o.backend),
                    "failure": o.failure.value,
                    "detail": o.detail,
                }
                for o in self.failures
            ],
            "skipped_dead": [_backend_json(o.backend) for o in self.skipped_dead],
            "skipped_no_control_channel": [
                {"backend": _backend_json(o.backend), "detail": o.detail}
                for o in self.skipped_no_control
            ],
        }


class BroadcastCollector(Generic[B]):
    """Collects per-backend outcomes of one live fan-out into a :class:`BroadcastResult`.

    ``backends`` are the targets in registration order (duplicates are ignored).
    The first outcome recorded for a backend wins; later ones (a late ACK after
    the shell already recorded a timeout, say) are ignored. When the result is
    taken, a target with no outcome counts as timed out after ``ack_timeout_s``.
    """

    __slots__ = ("_operation", "_order", "_outcomes", "_timeout_s")

    def __init__(
        self,
        operation: BroadcastOperation,
        backends: Iterable[B],
        ack_timeout_s: float = DEFAULT_BROADCAST_ACK_TIMEOUT_S,
    ) -> None:
        self._operation = operation
        self._timeout_s = clamp_duration_s(ack_timeout_s)
        self._order: dict[B, None] = dict.fromkeys(backends)
        self._outcomes: dict[B, BroadcastOutcome[B]] = {}

    @property
    def operation(self) -> BroadcastOperation:
        """The operation being broadcast."""
        return self._operation

    def record(self, outcome: BroadcastOutcome[B]) -> bool:
        """Record one backend's outcome; True if it was the first for that backend.

        Raises :class:`KeyError` for a backend that is not a target.
        """
        backend = outcome.backend
        if backend not in self._order:
            raise KeyError(backend)
        if backend in self._outcomes:
            return False
        self._outcomes[backend] = outcome
        return True

    def result(self) -> BroadcastResult[B]:
        """The result so far; targets without an outcome count as timed out."""
        acks: list[BackendAcked[B]] = []
        timeouts: list[BackendTimedOut[B]] = []
        failures: list[BackendFailed[B]] = []
        dead: list[BackendSkippedDead[B]] = []
        no_control: list[BackendSkippedNoControl[B]] = []
        for backend in self._order:
            outcome = self._outcomes.get(backend)
            if outcome is None:
                timeouts.append(BackendTimedOut(backend, self._timeout_s))
            elif isinstance(outcome, BackendAcked):
                acks.append(outcome)
            elif isinstance(outcome, BackendTimedOut):
                timeouts.append(outcome)
            elif isinstance(outcome, BackendFailed):
                failures.append(outcome)
            elif isinstance(outcome, BackendSkippedNoControl):
                no_control.append(outcome)
            else:
                dead.append(outcome)
        return BroadcastResult(
            self._operation,
            tuple(acks),
            tuple(timeouts),
            tuple(failures),
            tuple(dead),
            tuple(no_control),
        )
