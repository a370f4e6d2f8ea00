"""One backend incarnation's life as a pure transition table.

What this module does: :class:`BackendLifecycle` is the state machine of one
backend process from the moment the broker decides to start it until it has
exited and been reaped. It is fed typed inputs (the launch succeeded or failed,
the backend reported ready, its control link closed, the process exited with a
status, a quiesce was sent, a stop was requested, a timer fell due) and answers
each with a :class:`Step`: the new phase and the typed actions the shell must
carry out (signal the process group, settle the Hellos waiting for the spawn,
report how the incarnation ended). Every (phase, input) pair has a defined
result (``TRANSITIONS`` documents it and the tests walk it); an input that means
nothing in a phase changes nothing.

The guarantees the broker builds on live here, not in the shell:

- A backend is *routable* (new clients may be sent to it) only in RUNNING, and it
  leaves RUNNING on the first sign that it is going away: its control link
  closing, its process exiting, a quiesce, a stop. No input sequence makes a
  backend routable again once its process or control link is gone.
- Each incarnation settles its spawn exactly once (ready, or failed with the
  reason) and reports exactly one :class:`Outcome`, on entering EXITED.
- Timers are state: :attr:`BackendLifecycle.deadline` says when the shell must
  feed :class:`TimerFired` next (the ready ceiling while starting, the drain
  deadline while draining, the kill grace while stopping), so the shell never
  decides on its own when to escalate.

What it does not do: any I/O, clock reading or waiting (``now`` is an argument);
decide crash recovery across incarnations (``rpbroker.policy.recovery`` does,
given the :class:`Crashed` outcome); or know what a backend serves.
"""

from __future__ import annotations

import enum
import math
from typing import Final

import attrs

#: Seconds between SIGTERM and SIGKILL for a backend being stopped: long enough
#: for a backend to close its connections and exit cleanly, short enough that a
#: stop (and a broker shutdown) is bounded by the drain plus this.
DEFAULT_TERMINATE_GRACE_S: Final[float] = 1.0
#: Seconds a backend whose control link closed gets to exit by itself before
#: SIGKILL: a backend closes its link by exiting, so its own status (the useful
#: reason) normally arrives within milliseconds.
LINK_LOSS_GRACE_S: Final[float] = 1.0


class Phase(enum.Enum):
    """Where an incarnation is in its life."""

    #: The broker asked the launcher for a process; none exists yet.
    LAUNCHING = "launching"
    #: The process exists; waiting for it to report ready.
    STARTING = "starting"
    #: Ready and routable: new clients may be sent here.
    RUNNING = "running"
    #: Quiesced: finishing its live connections before its drain deadline.
    DRAINING = "draining"
    #: Being stopped: SIGTERM (or SIGKILL) sent, waiting for the exit.
    STOPPING = "stopping"
    #: The process has exited (or never started). Terminal.
    EXITED = "exited"


class StopCause(enum.Enum):
    """Why an incarnation is being stopped; decides how its exit is reported."""

    #: An operator (admin ``stop``/``restart``) or an idle quiesce asked for it.
    REQUESTED = "requested"
    #: The broker is shutting down.
    BROKER_SHUTDOWN = "broker-shutdown"
    #: Its drain deadline passed with connections still open.
    DRAIN_DEADLINE = "drain-deadline"
    #: It did not report ready before the spawn ceiling.
    READY_TIMEOUT = "ready-timeout"
    #: Its control link closed while it was starting or running (it cannot be
    #: handed connections or broadcasts any more, so it is retired).
    LINK_LOST = "link-lost"


class SpawnFailure(enum.Enum):
    """Why a spawn never became ready."""

    LAUNCH_ERROR = "launch-error"
    EXITED_BEFORE_READY = "exited-before-ready"
    READY_TIMEOUT = "ready-timeout"
    LINK_CLOSED_BEFORE_READY = "link-closed-before-ready"
    CANCELLED = "cancelled"


# -- inputs ---------------------------------------------------------------------------


@attrs.frozen
class Launched:
    """The launcher started the process (it has a pid, not yet ready)."""

    pid: int


@attrs.frozen
class LaunchFailed:
    """The launcher could not start the process."""

    detail: str


@attrs.frozen
class ReadyReported:
    """The backend said it listens and accepts work."""


@attrs.frozen
class ReadinessCheckFailed:
    """A readiness check of a backend without a control channel (a foreign backend) failed.

    Not a failure of the spawn: the shell checks again until the ready ceiling. The
    lifecycle remembers the latest ``detail`` so the ready timeout says what was seen.
    """

    detail: str


@attrs.frozen
class LinkClosed:
    """The broker's control link to the backend closed (EOF, reset, protocol error)."""


@attrs.frozen
class ProcessExited:
    """The process exited and was reaped with ``status`` (negative: killed by a signal)."""

    status: int


@attrs.frozen
class QuiesceSent:
    """A quiesce went out; the backend must be gone by ``drain_deadline`` (monotonic s)."""

    drain_deadline: float


@attrs.frozen
class StopRequested:
    """Stop this incarnation; ``grace_s`` between SIGTERM and SIGKILL."""

    cause: StopCause
    grace_s: float = DEFAULT_TERMINATE_GRACE_S


@attrs.frozen
class ForceKill:
    """Kill it now (broker cancelled or forced down): SIGKILL, no grace."""

    cause: StopCause = StopCause.BROKER_SHUTDOWN


@attrs.frozen
class TimerFired:
    """``now`` reached :attr:`BackendLifecycle.deadline`."""


Input = (
    Launched
    | LaunchFailed
    | ReadyReported
    | ReadinessCheckFailed
    | LinkClosed
    | ProcessExited
    | QuiesceSent
    | StopRequested
    | ForceKill
    | TimerFired
)

# -- actions --------------------------------------------------------------------------


@attrs.frozen
class Terminate:
    """Send SIGTERM to the backend's process group."""


@attrs.frozen
class Kill:
    """Send SIGKILL to the backend's process group."""


@attrs.frozen
class SettleSpawn:
    """Wake the Hellos waiting for this spawn: ready (``failure`` None) or failed."""

    failure: SpawnFailure | None
    detail: str = ""


@attrs.frozen
class BeganDraining:
    """The backend left RUNNING for DRAINING (announce it)."""


@attrs.frozen
class BeganStopping:
    """The backend is being stopped for ``cause`` (announce it)."""

    cause: StopCause


@attrs.frozen
class Ended:
    """The incarnation is over; report ``outcome`` (always the last action)."""

    outcome: Outcome


Action = Terminate | Kill | SettleSpawn | BeganDraining | BeganStopping | Ended

# -- outcomes -------------------------------------------------------------------------


@attrs.frozen
class Stopped:
    """It exited because the broker asked it to (quiesce, stop, shutdown)."""

    status: int | None
    cause: StopCause | None


@attrs.frozen
class Crashed:
    """It exited (or lost its control link) without being asked to.

    ``link_lost_first``: its control link closed before the exit was seen.
    ``killed``: it kept running without its link, and the broker killed it.
    """

    status: int | None
    link_lost_first: bool
    killed: bool = False


@attrs.frozen
class NeverReady:
    """The spawn failed: it never became ready."""

    failure: SpawnFailure
    detail: str
    status: int | None


Outcome = Stopped | Crashed | NeverReady


@attrs.frozen
class Step:
    """The answer to one input: the phase now and what the shell must do, in order."""

    phase: Phase
    actions: tuple[Action, ...] = ()


#: What each input does in each phase (documentation; the tests check it against
#: :meth:`BackendLifecycle.feed`). "-" means: ignored, nothing changes.
TRANSITIONS: Final[dict[tuple[Phase, type[Input]], str]] = {
    (Phase.LAUNCHING, Launched): "STARTING (ready timer) | STOPPING+Kill if a stop came first",
    (Phase.LAUNCHING, LaunchFailed): "EXITED: settle failed, NeverReady(launch-error)",
    (Phase.LAUNCHING, ReadyReported): "-",
    (Phase.LAUNCHING, ReadinessCheckFailed): "-",
    (Phase.LAUNCHING, LinkClosed): "- (remembered: replayed as soon as it is launched)",
    (Phase.LAUNCHING, ProcessExited): "- (remembered: replayed as soon as it is launched)",
    (Phase.LAUNCHING, QuiesceSent): "-",
    (Phase.LAUNCHING, StopRequested): "- (remembered: killed as soon as it is launched)",
    (Phase.LAUNCHING, ForceKill): "- (remembered: killed as soon as it is launched)",
    (Phase.LAUNCHING, TimerFired): "-",
    (Phase.STARTING, Launched): "-",
    (Phase.STARTING, LaunchFailed): "-",
    (Phase.STARTING, ReadyReported): "RUNNING: settle ready",
    (Phase.STARTING, ReadinessCheckFailed): "- (remembered: the ready timeout's detail names it)",
    (Phase.STARTING, LinkClosed): "STOPPING (kill timer): settles failed at the exit",
    (Phase.STARTING, ProcessExited): "EXITED: settle failed, NeverReady(exited-before-ready)",
    (Phase.STARTING, QuiesceSent): "-",
    (Phase.STARTING, StopRequested): "STOPPING+Kill: settle failed (cancelled)",
    (Phase.STARTING, ForceKill): "STOPPING+Kill: settle failed (cancelled)",
    (Phase.STARTING, TimerFired): "STOPPING+Kill: settle failed (ready timeout)",
    (Phase.RUNNING, Launched): "-",
    (Phase.RUNNING, LaunchFailed): "-",
    (Phase.RUNNING, ReadyReported): "-",
    (Phase.RUNNING, ReadinessCheckFailed): "-",
    (Phase.RUNNING, LinkClosed): "STOPPING (kill timer; link lost: its exit is a crash)",
    (Phase.RUNNING, ProcessExited): "EXITED: Crashed",
    (Phase.RUNNING, QuiesceSent): "DRAINING (drain timer)",
    (Phase.RUNNING, StopRequested): "STOPPING+Terminate (kill timer)",
    (Phase.RUNNING, ForceKill): "STOPPING+Kill",
    (Phase.RUNNING, TimerFired): "-",
    (Phase.DRAINING, Launched): "-",
    (Phase.DRAINING, LaunchFailed): "-",
    (Phase.DRAINING, ReadyReported): "-",
    (Phase.DRAINING, ReadinessCheckFailed): "-",
    (Phase.DRAINING, LinkClosed): "- (a draining backend closes its link as it exits)",
    (Phase.DRAINING, ProcessExited): "EXITED: Stopped",
    (Phase.DRAINING, QuiesceSent): "- (the earlier drain deadline stays)",
    (Phase.DRAINING, StopRequested): "STOPPING+Terminate (kill timer)",
    (Phase.DRAINING, ForceKill): "STOPPING+Kill",
    (Phase.DRAINING, TimerFired): "STOPPING+Terminate (drain deadline; kill timer)",
    (Phase.STOPPING, Launched): "-",
    (Phase.STOPPING, LaunchFailed): "-",
    (Phase.STOPPING, ReadyReported): "-",
    (Phase.STOPPING, ReadinessCheckFailed): "-",
    (Phase.STOPPING, LinkClosed): "-",
    (Phase.STOPPING, ProcessExited): "EXITED: Stopped, Crashed (link lost) or NeverReady",
    (Phase.STOPPING, QuiesceSent): "-",
    (Phase.STOPPING, StopRequested): "- (an earlier kill time wins; none after a kill)",
    (Phase.STOPPING, ForceKill): "Kill",
    (Phase.STOPPING, TimerFired): "Kill (grace over)",
    (Phase.EXITED, Launched): "-",
    (Phase.EXITED, LaunchFailed): "-",
    (Phase.EXITED, ReadyReported): "-",
    (Phase.EXITED, ReadinessCheckFailed): "-",
    (Phase.EXITED, LinkClosed): "-",
    (Phase.EXITED, ProcessExited): "-",
    (Phase.EXITED, QuiesceSent): "-",
    (Phase.EXITED, StopRequested): "-",
    (Phase.EXITED, ForceKill): "-",
    (Phase.EXITED, TimerFired): "-",
}


class BackendLifecycle:
    """The life of one incarnation. Feed it inputs; carry out the actions it returns.

    ``ready_timeout_s`` bounds STARTING (the spawn ceiling). Timers are absolute
    monotonic seconds: when :attr:`deadline` is not ``math.inf`` the shell feeds
    :class:`TimerFired` at that time. Not thread-safe; owned by one task tree.
    """

    __slots__ = (
        "_deadline",
        "_early",
        "_killed",
        "_last_check",
        "_pending_stop",
        "_phase",
        "_ready_timeout_s",
        "_settle_at_exit",
        "_spawn_failure",
        "_stop_cause",
        "pid",
    )

    def __init__(self, ready_timeout_s: float) -> None:
        self._ready_timeout_s = ready_timeout_s
        self._phase = Phase.LAUNCHING
        self._deadline = math.inf
        self._stop_cause: StopCause | None = None
        self._spawn_failure: tuple[SpawnFailure, str] | None = None
        self._pending_stop: StopCause | None = None
        self._settle_at_exit = False
        self._killed = False
        self._early: list[Input] = []
        self._last_check = ""
        #: The process id once launched (0 before).
        self.pid = 0

    # -- queries ---------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def routable(self) -> bool:
        """True only while new clients may be sent here (RUNNING)."""
        return self._phase is Phase.RUNNING

    @property
    def starting(self) -> bool:
        """True while a spawn is in progress (Hellos may wait for it)."""
        return self._phase in (Phase.LAUNCHING, Phase.STARTING)

    @property
    def exited(self) -> bool:
        return self._phase is Phase.EXITED

    @property
    def stop_cause(self) -> StopCause | None:
        """Why it is being stopped (set on entering STOPPING; kept once EXITED)."""
        return self._stop_cause

    @property
    def deadline(self) -> float:
        """When the shell must feed :class:`TimerFired` (``math.inf``: no timer)."""
        return self._deadline

    # -- the table -------------------------------------------------------------------

    def feed(self, event: Input, now: float) -> Step:
        """Apply ``event`` at monotonic time ``now``; return the new phase and the actions."""
        handler = _HANDLERS[self._phase]
        actions = handler(self, event, now)
        return Step(self._phase, actions)

    # -- per phase ---------------------------------------------------------------------

    def _launching(self, event: Input, now: float) -> tuple[Action, ...]:
        if isinstance(event, Launched):
            self.pid = event.pid
            if self._pending_stop is not None:
                self._spawn_failure = (SpawnFailure.CANCELLED, "spawn cancelled before it started")
                return (
                    *self._to_stopping(self._pending_stop, now, signal=Kill()),
                    SettleSpawn(SpawnFailure.CANCELLED, "spawn cancelled"),
                )
            self._phase = Phase.STARTING
            self._deadline = now + self._ready_timeout_s
            replayed: tuple[Action, ...] = ()
            for early in self._early:
                replayed += _HANDLERS[self._phase](self, early, now)
            self._early.clear()
            return replayed
        if isinstance(event, LaunchFailed):
            return self._to_exited(
                NeverReady(SpawnFailure.LAUNCH_ERROR, event.detail, None),
                SettleSpawn(SpawnFailure.LAUNCH_ERROR, event.detail),
            )
        if isinstance(event, StopRequested | ForceKill):
            self._pending_stop = event.cause
        elif isinstance(event, LinkClosed | ProcessExited):
            # Cannot happen in order (the watchers start after the launch), but the
            # table is total: a death reported early is replayed once launched.
            self._early.append(event)
        return ()

    def _starting(self, event: Input, now: float) -> tuple[Action, ...]:
        if isinstance(event, ReadyReported):
            self._phase = Phase.RUNNING
            self._deadline = math.inf
            return (SettleSpawn(None),)
        if isinstance(event, ProcessExited):
            detail = f"exited with status {event.status} before becoming ready"
            return self._to_exited(
                NeverReady(SpawnFailure.EXITED_BEFORE_READY, detail, event.status),
                SettleSpawn(SpawnFailure.EXITED_BEFORE_READY, detail),
            )
        if isinstance(event, LinkClosed):
            # Usually the process is exiting: wait a moment for its own status (the
            # useful reason), then kill it. The spawn settles at the exit.
            self._settle_at_exit = True
            return self._to_stopping(
                StopCause.LINK_LOST, now, signal=None, grace_s=LINK_LOSS_GRACE_S
            )
        if isinstance(event, ReadinessCheckFailed):
            self._last_check = event.detail
            return ()
        failure: tuple[SpawnFailure, str, StopCause] | None = None
        if isinstance(event, TimerFired):
            seen = f" (last readiness check: {self._last_check})" if self._last_check else ""
            failure = (
                SpawnFailure.READY_TIMEOUT,
                f"not ready within {self._ready_timeout_s:g} s{seen}",
                StopCause.READY_TIMEOUT,
            )
        elif isinstance(event, StopRequested | ForceKill):
            failure = (SpawnFailure.CANCELLED, "spawn cancelled", event.cause)
        if failure is None:
            return ()
        kind, detail, cause = failure
        self._spawn_failure = (kind, detail)
        return (*self._to_stopping(cause, now, signal=Kill()), SettleSpawn(kind, detail))

    def _running(self, event: Input, now: float) -> tuple[Action, ...]:
        if isinstance(event, ProcessExited):
            return self._to_exited(Crashed(event.status, link_lost_first=False))
        if isinstance(event, LinkClosed):
            # Unroutable at once; it gets a moment to exit by itself, then SIGKILL.
            return self._to_stopping(
                StopCause.LINK_LOST, now, signal=None, grace_s=LINK_LOSS_GRACE_S
            )
        if isinstance(event, QuiesceSent):
            self._phase = Phase.DRAINING
            self._deadline = event.drain_deadline
            return (BeganDraining(),)
        if isinstance(event, StopRequested):
            return self._to_stopping(event.cause, now, signal=Terminate(), grace_s=event.grace_s)
        if isinstance(event, ForceKill):
            return self._to_stopping(event.cause, now, signal=Kill())
        return ()

    def _draining(self, event: Input, now: float) -> tuple[Action, ...]:
        if isinstance(event, ProcessExited):
            return self._to_exited(Stopped(event.status, None))
        if isinstance(event, QuiesceSent):
            self._deadline = min(self._deadline, event.drain_deadline)
            return ()
        if isinstance(event, TimerFired):
            return self._to_stopping(StopCause.DRAIN_DEADLINE, now, signal=Terminate())
        if isinstance(event, StopRequested):
            return self._to_stopping(event.cause, now, signal=Terminate(), grace_s=event.grace_s)
        if isinstance(event, ForceKill):
            return self._to_stopping(event.cause, now, signal=Kill())
        return ()

    def _stopping(self, event: Input, now: float) -> tuple[Action, ...]:
        if isinstance(event, ProcessExited):
            if self._settle_at_exit:
                if self._killed:
                    detail = "closed its control channel before becoming ready, and was killed"
                else:
                    detail = f"exited with status {event.status} before becoming ready"
                return self._to_exited(
                    NeverReady(SpawnFailure.LINK_CLOSED_BEFORE_READY, detail, event.status),
                    SettleSpawn(SpawnFailure.LINK_CLOSED_BEFORE_READY, detail),
                )
            outcome: Outcome
            if self._spawn_failure is not None:
                kind, detail = self._spawn_failure
                outcome = NeverReady(kind, detail, event.status)
            elif self._stop_cause is StopCause.LINK_LOST:
                outcome = Crashed(event.status, link_lost_first=True, killed=self._killed)
            else:
                outcome = Stopped(event.status, self._stop_cause)
            return self._to_exited(outcome)
        if isinstance(event, TimerFired | ForceKill):
            self._deadline = math.inf
            self._killed = True
            return (Kill(),)
        if isinstance(event, StopRequested) and not self._killed:
            self._deadline = min(self._deadline, now + event.grace_s)
        return ()

    def _exited(self, event: Input, now: float) -> tuple[Action, ...]:
        return ()

    # -- moves -------------------------------------------------------------------------

    def _to_stopping(
        self,
        cause: StopCause,
        now: float,
        *,
        signal: Terminate | Kill | None,
        grace_s: float = DEFAULT_TERMINATE_GRACE_S,
    ) -> tuple[Action, ...]:
        """Move to STOPPING for ``cause``: send ``signal`` now; SIGKILL after ``grace_s``.

        After SIGKILL no timer is left: only the exit ends STOPPING.
        """
        self._phase = Phase.STOPPING
        self._stop_cause = cause
        if isinstance(signal, Kill):
            self._deadline = math.inf
            self._killed = True
            return (BeganStopping(cause), signal)
        self._deadline = now + grace_s
        return (BeganStopping(cause),) if signal is None else (BeganStopping(cause), signal)

    def _to_exited(self, outcome: Outcome, *first: Action) -> tuple[Action, ...]:
        self._phase = Phase.EXITED
        self._deadline = math.inf
        # The exit leaves nothing running: stragglers of its group are killed too.
        return (*first, Kill(), Ended(outcome))


_HANDLERS: Final = {
    Phase.LAUNCHING: BackendLifecycle._launching,
    Phase.STARTING: BackendLifecycle._starting,
    Phase.RUNNING: BackendLifecycle._running,
    Phase.DRAINING: BackendLifecycle._draining,
    Phase.STOPPING: BackendLifecycle._stopping,
    Phase.EXITED: BackendLifecycle._exited,
}
