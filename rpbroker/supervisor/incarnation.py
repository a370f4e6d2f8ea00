"""One backend incarnation: its process, its control link, and the task that drives its life.

What this module does: :class:`Incarnation` is one attempt to run the backend of a
(instance, service, version) key, from the launch until the process has exited
and been reaped. It owns the process handle and the :class:`BackendLink`, and it
is the only writer of its :class:`~rpbroker.policy.lifecycle.BackendLifecycle`:
everything that can happen to the backend (launch result, readiness, the link
closing, the exit, a quiesce, a stop, a timer) is fed to the lifecycle through
:meth:`Incarnation.feed`, synchronously, and the actions it returns are carried
out on the spot (signal the group, settle the waiting Hellos, announce the
transition). So the moment the control link closes or the process exits, the
backend is unroutable: there is no window in which another task still sees it
as running.

:meth:`Incarnation.run` hosts the incarnation's tasks (process watcher, link
reader, or the readiness checks of a foreign backend, which has no link; timers)
and, however it ends (exit, cancellation), kills and reaps what
is left, closes the link and removes the endpoint file, within a bound.

What it does not do: decide whether to start it, respawn it or refuse Hellos
for its key (``rpbroker.supervisor.registry`` does, told through
:class:`IncarnationOwner`), or fan out broadcasts (``fanout``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog
from rpbroker.launcher import BackendLauncher, LaunchRequest
from rpbroker.policy.broadcast import QuiesceReason
from rpbroker.policy.lifecycle import (
    DEFAULT_TERMINATE_GRACE_S,
    Action,
    BackendLifecycle,
    BeganDraining,
    BeganStopping,
    Crashed,
    Ended,
    ForceKill,
    Input,
    Kill,
    Launched,
    LaunchFailed,
    LinkClosed,
    NeverReady,
    Outcome,
    Phase,
    ProcessExited,
    QuiesceSent,
    ReadyReported,
    SettleSpawn,
    SpawnFailure,
    StopCause,
    Stopped,
    StopRequested,
    Terminate,
    TimerFired,
)
from rpbroker.services import ENDPOINT_TOKEN_HEX_DIGITS, ServiceSpec
from rpbroker.supervisor import readiness
from rpbroker.supervisor.link import BackendLink
from rpbroker.supervisor.output import OutputCapture, OutputLog

logger = logging.getLogger("rpbroker.supervisor")

#: Bound on reaping a killed backend, seconds. SIGKILL takes effect at once; this
#: only trips for a process stuck in uninterruptible sleep, which is then logged
#: and left to the kernel rather than hanging the broker's shutdown.
REAP_TIMEOUT_S: Final[float] = 5.0

#: Status text of each phase in STATUS rows (the reference's names where it has one).
_STATUS: Final[dict[Phase, str]] = {
    Phase.LAUNCHING: "spawning",
    Phase.STARTING: "spawning",
    Phase.RUNNING: "running",
    Phase.DRAINING: "draining",
    Phase.STOPPING: "stopping",
    Phase.EXITED: "stopped",
}


@attrs.frozen
class BackendKey:
    """Identity of a backend in the registry: one per (instance, service, version)."""

    instance: str
    service_name: str
    service_version: str


class IncarnationOwner(Protocol):
    """What an incarnation tells the registry that owns its key."""

    def spawn_settled(self, incarnation: Incarnation, ready: bool) -> None: ...

    def left_service(self, incarnation: Incarnation) -> None:
        """It is no longer routable or starting: a new Hello needs a new incarnation."""

    def activity(self, incarnation: Incarnation) -> None: ...

    def healthy(self, incarnation: Incarnation) -> None:
        """It stayed routable for a whole recovery window."""

    def ended(self, incarnation: Incarnation, outcome: Outcome) -> None: ...


class Incarnation:
    """One backend process of ``key`` and everything the broker holds for it."""

    def __init__(
        self,
        key: BackendKey,
        spec: ServiceSpec,
        *,
        config: BrokerConfig,
        events: EventLog,
        launcher: BackendLauncher,
        owner: IncarnationOwner,
        output_log: OutputLog | None = None,
    ) -> None:
        self.key = key
        self.spec = spec
        self.endpoint = _endpoint_for(key, spec, config)
        self._config = config
        self._events = events
        self._launcher = launcher
        self._owner = owner
        ready_timeout_s = config.spawn_ready_timeout_s
        if spec.foreign is not None and spec.foreign.ready_timeout_secs is not None:
            ready_timeout_s = spec.foreign.ready_timeout_secs
        self.lifecycle = BackendLifecycle(ready_timeout_s=ready_timeout_s)
        self.process: transports.ChildProcess | None = None
        self.link: BackendLink | None = None
        self.started_at_unix_ms = _wall_ms()
        self.ready_at_unix_ms: int | None = None
        self.last_active_unix_ms = self.started_at_unix_ms
        self.open_connections = 0
        self.completed_connections = 0
        #: Why the spawn failed (``None`` while starting or once ready).
        self.spawn_failure: SpawnFailure | None = None
        self.spawn_failure_detail = ""
        self.outcome: Outcome | None = None
        self.settled = trio.Event()
        #: Set once the process has exited (the outcome is known).
        self.exited = trio.Event()
        #: Set once everything is released (reaped, link closed, endpoint removed).
        self.ended = trio.Event()
        self._quiesce_reason: QuiesceReason | None = None
        self._timer: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._output_log = output_log
        #: Its captured stdout/stderr, when the launcher captured them.
        self.output: OutputCapture | None = None

    def __repr__(self) -> str:
        return (
            f"<Incarnation {self.key.service_name} {self.key.service_version} "
            f"pid={self.pid} {self.lifecycle.phase.value}>"
        )

    # -- queries ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.lifecycle.pid

    @property
    def has_control_channel(self) -> bool:
        """False for a foreign backend: no handoff, no broadcasts, readiness by checks."""
        return self.spec.foreign is None

    @property
    def routable(self) -> bool:
        """True while new clients may be sent here (see ``BackendLifecycle.routable``)."""
        return self.lifecycle.routable

    @property
    def status(self) -> str:
        """The STATUS ``state`` of this incarnation."""
        if isinstance(self.outcome, Crashed):
            return "crashed"
        if isinstance(self.outcome, NeverReady):
            return "failed"
        return _STATUS[self.lifecycle.phase]

    def to_json(self) -> dict[str, Any]:
        """The STATUS / broadcast row of this incarnation."""
        return {
            "service_name": self.key.service_name,
            "service_version": self.key.service_version,
            "instance": self.key.instance,
            "pid": self.pid,
            "backend_pipe": self.endpoint,
            "state": self.status,
            "open_connections": self.open_connections,
            "started_at_unix_ms": self.started_at_unix_ms,
            "ready_at_unix_ms": self.ready_at_unix_ms,
            "last_active_unix_ms": self.last_active_unix_ms,
        }

    # -- driving the lifecycle -----------------------------------------------------------

    def feed(self, event: Input) -> None:
        """Apply ``event`` to the lifecycle now and carry out its actions."""
        step = self.lifecycle.feed(event, trio.current_time())
        for action in step.actions:
            self._execute(action)
        if self._timer is not None:
            self._timer.deadline = self.lifecycle.deadline

    def quiesce_sent(self, reason: QuiesceReason, drain_deadline: float) -> None:
        """A quiesce for ``reason`` is going out; it must be gone by ``drain_deadline``."""
        self._quiesce_reason = reason
        self.feed(QuiesceSent(drain_deadline))

    def note_routed(self) -> None:
        """A client is being sent here: activity, for idle tracking."""
        self.last_active_unix_ms = _wall_ms()
        self._owner.activity(self)

    def _execute(self, action: Action) -> None:
        if isinstance(action, Terminate):
            if self.process is not None:
                self.process.terminate_tree()
        elif isinstance(action, Kill):
            if self.process is not None:
                self.process.kill_tree()
        elif isinstance(action, SettleSpawn):
            self._settle(action)
        elif isinstance(action, BeganDraining):
            self._owner.left_service(self)
            self._emit(
                EventKind.DRAINING,
                reason=(self._quiesce_reason or QuiesceReason.MAINTENANCE).value,
            )
        elif isinstance(action, BeganStopping):
            self._owner.left_service(self)
            self._emit(EventKind.STOPPING, reason=action.cause.value)
        else:
            assert isinstance(action, Ended)
            self._end(action.outcome)

    def _settle(self, action: SettleSpawn) -> None:
        if action.failure is None:
            self.ready_at_unix_ms = self.last_active_unix_ms = _wall_ms()
            self._emit(EventKind.RUNNING, endpoint=self.endpoint)
            if self._nursery is not None:
                self._nursery.start_soon(self._healthy_after, self._config.recovery_window_s)
        else:
            self.spawn_failure = action.failure
            tail = self.stderr_tail()
            self.spawn_failure_detail = (
                f"{action.detail}; its stderr ended with:\n{tail}" if tail else action.detail
            )
            self._owner.left_service(self)
        self.settled.set()
        self._owner.spawn_settled(self, action.failure is None)

    def _end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.exited.set()
        if isinstance(outcome, Stopped):
            self._emit(
                EventKind.STOPPED,
                status=outcome.status,
                cause=None if outcome.cause is None else outcome.cause.value,
            )
        elif isinstance(outcome, Crashed):
            reason = (
                "closed its control channel and did not exit: killed"
                if outcome.killed
                else f"exited unexpectedly with status {outcome.status}"
            )
            self._emit(
                EventKind.CRASHED,
                reason=reason,
                status=outcome.status,
                link_lost_first=outcome.link_lost_first,
            )
        else:
            self._emit(
                EventKind.SPAWN_FAILED,
                reason=f"backend spawn failed: {outcome.detail}",
                failure=outcome.failure.value,
                status=outcome.status,
                stderr_tail=self.stderr_tail(),
            )
        self._owner.ended(self, outcome)

    def _emit(self, kind: EventKind, *, reason: str = "", **details: Any) -> None:
        self._events.emit(
            kind,
            service_name=self.key.service_name,
            service_version=self.key.service_version,
            pid=self.pid,
            reason=reason,
            **details,
        )

    # -- the link's observer -----------------------------------------------------------

    def link_ready(self, notice: control.ReadyNotice) -> None:
        self.feed(ReadyReported())

    def link_activity(self, notice: control.ActivityNotice) -> None:
        self.open_connections = notice.open_connections
        self.completed_connections = notice.completed_connections
        self.note_routed()

    def link_closed(self, reason: str) -> None:
        logger.debug("control link of %r closed: %s", self, reason)
        self.feed(LinkClosed())

    # -- the life -------------------------------------------------------------------------

    async def run(self) -> None:
        """Launch the backend and drive its life until it has exited and been reaped.

        Cancellation: the backend is killed (SIGKILL to its group) and reaped
        within ``REAP_TIMEOUT_S``, its link closed and its endpoint file
        removed; the cleanup is shielded and bounded, so cancelling this returns
        promptly and leaves no process, descriptor or file behind.
        """
        self._emit(EventKind.SPAWNING, endpoint=self.endpoint)
        try:
            request = LaunchRequest(
                service_name=self.key.service_name,
                service_version=self.key.service_version,
                instance=self.key.instance,
                endpoint=self.endpoint,
                spec=self.spec,
                extra_env=self._config.backend_env,
            )
            try:
                launched = await self._launcher.launch(request)
            except (transports.SpawnError, OSError) as exc:
                # OSError: e.g. EMFILE creating the control channel under fd pressure.
                self.feed(LaunchFailed(str(exc)))
                return
            self.process = launched.process
            if launched.channel is not None:
                self.link = BackendLink(launched.channel, self)
            self._capture_output(launched.process)
            self.feed(Launched(launched.process.pid))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.output is not None:
                    nursery.start_soon(self.output.run)
                nursery.start_soon(self._watch_process, launched.process)
                if self.link is not None:
                    nursery.start_soon(self.link.run)
                elif self.spec.foreign is not None:
                    nursery.start_soon(readiness.check_until_ready, self, self.spec.foreign)
                await self._run_timers()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _watch_process(self, process: transports.ChildProcess) -> None:
        status = await process.wait()
        if self.output is not None:
            await self.output.wait_drained()  # its last words first (see stderr_tail)
        self.feed(ProcessExited(status))

    def _capture_output(self, process: transports.ChildProcess) -> None:
        if process.output is not None:
            log = self._output_log if self._output_log is not None else OutputLog()
            backend = log.open_backend(self.key.service_name, self.key.service_version, process.pid)
            self.output = OutputCapture(process.output, backend)

    def stderr_tail(self) -> str:
        """The last lines of its stderr, bounded (empty when not captured)."""
        return "" if self.output is None else self.output.backend.stderr_tail()

    async def _run_timers(self) -> None:
        """Feed ``TimerFired`` whenever the lifecycle's deadline passes, until it exits."""
        while not self.lifecycle.exited:
            with trio.CancelScope(deadline=self.lifecycle.deadline) as timer:
                self._timer = timer
                await self.exited.wait()
            self._timer = None
            if timer.cancelled_caught and not self.lifecycle.exited:
                self.feed(TimerFired())

    async def _healthy_after(self, window_s: float) -> None:
        await trio.sleep(window_s)
        if self.routable:
            self._owner.healthy(self)

    async def _finish(self) -> None:
        """Make sure the process is gone and reaped, then release everything (shielded)."""
        if not self.lifecycle.exited:
            self.feed(ForceKill())
            if self.lifecycle.phase is Phase.LAUNCHING:
                self.feed(LaunchFailed("spawn cancelled before the process started"))
            elif self.process is not None:
                with trio.move_on_after(REAP_TIMEOUT_S):
                    self.feed(ProcessExited(await self.process.wait()))
                if not self.lifecycle.exited:
                    logger.error("backend pid=%s did not die within %g s", self.pid, REAP_TIMEOUT_S)
                    self.feed(ProcessExited(-9))
        if self.link is not None:
            await self.link.aclose()
        if self.output is not None:
            await self.output.aclose()
            if self._output_log is not None:
                self._output_log.backend_ended(self.output.backend)
        _discard_endpoint(self.endpoint, foreign=self.spec.foreign is not None)
        self.ended.set()

    def stop(
        self, cause: StopCause = StopCause.REQUESTED, grace_s: float = DEFAULT_TERMINATE_GRACE_S
    ) -> None:
        """Ask it to stop: SIGTERM, then SIGKILL after ``grace_s`` (see the lifecycle)."""
        self.feed(StopRequested(cause, grace_s))

    def kill(self) -> None:
        """Kill it now (SIGKILL to its group)."""
        self.feed(ForceKill())


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _endpoint_for(key: BackendKey, spec: ServiceSpec, config: BrokerConfig) -> str:
    """A fresh backend endpoint, or a foreign backend's own (its template filled)."""
    if spec.foreign is None:
        return transports.new_backend_endpoint(config.runtime_dir)
    runtime = config.runtime_dir or transports.runtime_dir(create=False)
    return spec.foreign.endpoint_for(
        os.fspath(runtime),
        key.service_name,
        key.service_version,
        secrets.token_hex(ENDPOINT_TOKEN_HEX_DIGITS // 2),
    )


def _discard_endpoint(endpoint: str, *, foreign: bool = False) -> None:
    """Remove a dead backend's endpoint file, if the platform has one.

    A foreign backend's endpoint may be a fixed path the broker did not make: it
    is removed only when it is provably a dead socket of this user.
    """
    if foreign:
        with contextlib.suppress(transports.TransportError, OSError):
            transports.clear_stale_endpoint(endpoint)
        return
    path = Path(endpoint)
    if path.is_absolute():
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
