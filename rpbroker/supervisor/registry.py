"""The backend registry: which incarnation serves each key, single-flight spawns, recovery.

What this module does: :class:`BackendRegistry` owns every backend incarnation
the broker started. For an (instance, service, version) key it returns the
routable incarnation, or starts exactly one that concurrent Hellos share (under
the spawn budget per key and the cap per service), waiting for it to settle.
Incarnations run as tasks of the registry's own nursery, so a Hello that leaves
cancels only its own wait. When an incarnation leaves service (draining,
stopping, exited) the key is free at once for a fresh one; when it ends, the
crash-recovery policy decides what follows (one retry after the back-off, then
"unavailable" until the window ends). It also keeps the idle tracker of routable
incarnations, and stops everything at shutdown within a bound.

What it does not do: drive an incarnation's life (``incarnation``), fan out
broadcasts (``fanout``), decide policy arithmetic (``rpbroker.policy``), or talk
to clients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVarTuple, Unpack

import attrs
import trio

from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog
from rpbroker.launcher import BackendLauncher, ProcessLauncher
from rpbroker.policy._units import ms_ceil
from rpbroker.policy.broadcast import (
    BroadcastOperation,
    BroadcastResult,
    Quiesce,
    QuiesceReason,
)
from rpbroker.policy.hello import Refusal
from rpbroker.policy.idle import IdleDue, IdleTracker
from rpbroker.policy.lifecycle import Crashed, Outcome, StopCause
from rpbroker.policy.recovery import CrashRecovery, MarkUnavailable, RetryAfterBackoff
from rpbroker.policy.spawn_budget import (
    BudgetExhausted,
    SpawnInProgress,
    SpawnLimiter,
    SpawnOutcome,
)
from rpbroker.services import ServiceSpec
from rpbroker.supervisor import fanout
from rpbroker.supervisor.incarnation import REAP_TIMEOUT_S, BackendKey, Incarnation
from rpbroker.supervisor.output import OutputLog
from rpbroker.wire.codes import RefusalCode

logger = logging.getLogger("rpbroker.supervisor")

PosArgsT = TypeVarTuple("PosArgsT")

#: retry_after for a failed spawn, ms (facts §5.6: 1000 ms).
SPAWN_FAILED_RETRY_AFTER_MS: Final[int] = 1000
#: retry_after for a Hello refused because the broker is stopping, ms: a new broker
#: usually takes over within seconds.
SHUTTING_DOWN_RETRY_AFTER_MS: Final[int] = 1000

SpawnHook = Callable[[BackendKey, SpawnOutcome], None]

#: Slack on waiting for an operator-stopped backend to end, seconds, beyond its
#: terminate grace and the reap bound: the exit is processed by its own task.
STOP_WAIT_SLACK_S: Final[float] = 1.0


@attrs.frozen
class StoppedBackend:
    """One backend an operator's ``stop``/``restart`` ended (or that outlived the wait)."""

    service_version: str
    instance: str
    pid: int
    #: Its STATUS state after the wait (``stopped``, ``crashed``, ``failed``, or
    #: ``stopping`` if it had not ended yet).
    state: str
    exit_status: int | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class BackendRegistry:
    """Every backend incarnation of one broker, and the tasks that keep them.

    ``run`` must be started (``nursery.start``) before ``acquire``. All methods
    run in the broker's trio thread.
    """

    def __init__(
        self,
        config: BrokerConfig,
        events: EventLog,
        launcher: BackendLauncher | None = None,
        on_spawn: SpawnHook | None = None,
    ) -> None:
        self._config = config
        self._events = events
        self._launcher: BackendLauncher = launcher or ProcessLauncher()
        self._on_spawn = on_spawn
        #: The incarnation serving new Hellos for each key (starting or routable).
        self._current: dict[BackendKey, Incarnation] = {}
        #: Every incarnation not yet ended, in start order.
        self._live: dict[Incarnation, None] = {}
        #: Incarnations whose spawn counts against the budget.
        self._budgeted: set[Incarnation] = set()
        self._limiter: SpawnLimiter[BackendKey, tuple[str, str]] = SpawnLimiter(
            config.spawn_attempts_per_window,
            config.spawn_window_s,
            config.spawn_attempts_per_service_window,
        )
        self._recovery: CrashRecovery[BackendKey] = CrashRecovery(
            config.recovery_backoff_s, config.recovery_window_s
        )
        #: Keys that crashed and have not been seen healthy (or serving again) since.
        self._crashed: set[BackendKey] = set()
        self._unavailable: set[BackendKey] = set()
        #: Incarnations whose control link closed unasked: a crash whose exit is
        #: not processed yet. A Hello waits for it (bounded by the link-loss
        #: grace), so the crash is counted before anything new is started.
        self._dying: dict[BackendKey, Incarnation] = {}
        #: Incarnations started per key so far (a retry is only for the one that crashed).
        self._starts: dict[BackendKey, int] = {}
        #: Services an operator stopped: Hellos are refused until a restart.
        self._held: set[str] = set()
        #: Every backend's captured output (``rpbroker logs``).
        self.output = OutputLog()
        self._idle: IdleTracker[Incarnation] = IdleTracker()
        self._idle_changed = trio.Event()
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        # The registry's tasks are shielded from the broker's cancellation until the
        # broker has finished its graceful stop and calls ``release`` (which the
        # broker does on every exit path, before waiting for them).
        self._scope = trio.CancelScope(shield=True)

    # -- hosting -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the incarnations' tasks until ``release``.

        Cancellation: shielded until ``release`` is called (so a cancelled broker
        can still quiesce its backends), then every incarnation is killed and
        reaped within its bound. ``release`` is called by the broker itself on
        every way out of ``Broker.serve``.
        """
        # A start cancelled before this task first ran has nothing to host. (Once
        # shielded, a task that calls started() under a cancelled start() would
        # stay in start()'s nursery forever: trio then does not move it.)
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        self._nursery = None

    def release(self) -> None:
        """End ``run``: every incarnation still alive is killed and reaped."""
        self._stopping = True
        self._scope.cancel()

    def _spawn_task(
        self, fn: Callable[[Unpack[PosArgsT]], Awaitable[object]], *args: *PosArgsT
    ) -> None:
        if self._nursery is None:
            raise RuntimeError("the backend registry is not running")
        self._nursery.start_soon(fn, *args)

    # -- queries -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Incarnation]:
        """Every live incarnation (not yet ended), in start order."""
        return iter(list(self._live))

    def current(self, key: BackendKey) -> Incarnation | None:
        """The incarnation serving new Hellos for ``key`` (starting or routable), if any."""
        return self._current.get(key)

    def routable(self, key: BackendKey) -> Incarnation | None:
        """The routable incarnation for ``key``, if any (no waiting)."""
        incarnation = self._current.get(key)
        return incarnation if incarnation is not None and incarnation.routable else None

    def spawn_budget_rows(self, now: float) -> list[dict[str, Any]]:
        """One JSON row per key with spawn-budget state (STATUS, DUMP, METRICS)."""
        rows: list[dict[str, Any]] = []
        budget = self._limiter.keys
        for key in budget.keys():  # noqa: SIM118 - SpawnBudget is not a mapping
            snap = budget.snapshot(key, now)
            rows.append(
                {
                    "broker_instance": key.instance,
                    "service_name": key.service_name,
                    "service_version": key.service_version,
                    "attempts_used": snap.attempts_used,
                    "remaining": snap.remaining,
                    "in_flight": snap.in_flight,
                    "retry_after_ms": None
                    if snap.retry_after_s is None
                    else ms_ceil(snap.retry_after_s),
                }
            )
        return rows

    # -- find or start -------------------------------------------------------------------

    async def acquire(self, key: BackendKey, spec: ServiceSpec) -> Incarnation | Refusal:
        """Return the routable incarnation for ``key``, starting one if needed.

        Concurrent callers for one key share one spawn. Returns a ``Refusal`` when
        the broker is stopping, the key is unavailable after crashes, the spawn
        budget is spent, or the spawn failed.

        Cancellation: abandons only the caller's wait; a spawn in progress goes
        on for the other waiters (it runs in the registry's nursery).
        """
        while True:
            if self._stopping:
                await trio.lowlevel.checkpoint()
                return Refusal(
                    RefusalCode.SHUTTING_DOWN,
                    "broker is shutting down",
                    SHUTTING_DOWN_RETRY_AFTER_MS,
                )
            if key.service_name in self._held:
                await trio.lowlevel.checkpoint()
                return Refusal(
                    RefusalCode.BACKEND_SPAWN_FAILED,
                    f"service {key.service_name!r} was stopped by an operator; "
                    f"`rpbroker restart {key.service_name}` starts it again",
                )
            dying = self._dying.get(key)
            if dying is not None:
                await dying.exited.wait()
                continue
            incarnation = self._current.get(key)
            if incarnation is not None:
                if incarnation.routable:
                    await trio.lowlevel.checkpoint()
                    return incarnation
                await incarnation.settled.wait()
                if incarnation.routable:
                    return incarnation
                if self._stopping:
                    continue  # cancelled by the shutdown: say so, not "spawn failed"
                if incarnation.spawn_failure is not None:
                    return Refusal(
                        RefusalCode.BACKEND_SPAWN_FAILED,
                        f"backend spawn failed: {incarnation.spawn_failure_detail}",
                        SPAWN_FAILED_RETRY_AFTER_MS,
                    )
                continue  # ready but already gone again: look again
            refusal = self._begin(key, spec, trio.current_time())
            if refusal is not None:
                await trio.lowlevel.checkpoint()
                return refusal

    def _begin(self, key: BackendKey, spec: ServiceSpec, now: float) -> Refusal | None:
        """Start a budgeted spawn for ``key``, or say why not."""
        unavailable = self._recovery.unavailable(key, now)
        if unavailable is not None:
            return Refusal(
                RefusalCode.BACKEND_SPAWN_FAILED,
                "backend crashed twice within the recovery window and is unavailable",
                unavailable.retry_after_ms,
            )
        decision = self._limiter.try_begin(key, (key.instance, key.service_name), now)
        if isinstance(decision, BudgetExhausted):
            return Refusal(
                RefusalCode.RATE_LIMITED, "backend spawn budget exhausted", decision.retry_after_ms
            )
        # In progress is impossible here: ``_current`` holds every spawn in flight.
        assert not isinstance(decision, SpawnInProgress), f"{key}: spawn budget out of step"
        self._budgeted.add(self._start(key, spec))
        return None

    def _start(self, key: BackendKey, spec: ServiceSpec) -> Incarnation:
        incarnation = Incarnation(
            key,
            spec,
            config=self._config,
            events=self._events,
            launcher=self._launcher,
            owner=self,
            output_log=self.output,
        )
        self._current[key] = incarnation
        self._live[incarnation] = None
        self._starts[key] = self._starts.get(key, 0) + 1
        self._spawn_task(incarnation.run)
        return incarnation

    # -- told by incarnations (IncarnationOwner) -------------------------------------------

    def spawn_settled(self, incarnation: Incarnation, ready: bool) -> None:
        outcome = SpawnOutcome.SUCCEEDED if ready else SpawnOutcome.FAILED
        key = incarnation.key
        if incarnation in self._budgeted:
            self._budgeted.discard(incarnation)
            self._limiter.finish(
                key, (key.instance, key.service_name), outcome, trio.current_time()
            )
        if self._on_spawn is not None:
            self._on_spawn(key, outcome)
        if ready:
            self._track_idle(incarnation)
            if key in self._unavailable:
                self._unavailable.discard(key)
                self._crashed.discard(key)
                self._emit_key(EventKind.RECOVERED, key, reason="serving again after the window")

    def left_service(self, incarnation: Incarnation) -> None:
        key = incarnation.key
        if self._current.get(key) is incarnation:
            del self._current[key]
            if incarnation.lifecycle.stop_cause is StopCause.LINK_LOST:
                self._dying[key] = incarnation
        self._idle.remove(incarnation)

    def activity(self, incarnation: Incarnation) -> None:
        if incarnation.routable:
            self._track_idle(incarnation)

    def healthy(self, incarnation: Incarnation) -> None:
        key = incarnation.key
        if key in self._crashed:
            self._crashed.discard(key)
            self._recovery.record_success(key)
            self._emit_key(
                EventKind.RECOVERED,
                key,
                pid=incarnation.pid,
                reason="healthy for a whole recovery window: crash record cleared",
            )

    def ended(self, incarnation: Incarnation, outcome: Outcome) -> None:
        self.left_service(incarnation)
        if self._dying.get(incarnation.key) is incarnation:
            del self._dying[incarnation.key]
        self._live.pop(incarnation, None)
        self._budgeted.discard(incarnation)
        if not isinstance(outcome, Crashed) or self._stopping:
            return
        key = incarnation.key
        self._crashed.add(key)
        decision = self._recovery.record_crash(key, trio.current_time())
        if isinstance(decision, RetryAfterBackoff):
            if key in self._current:
                # A Hello started a successor while this one was on its way out
                # (its link closed first): that successor is the one retry.
                self._emit_key(
                    EventKind.RETRYING, key, delay_ms=0, reason="one retry: already starting"
                )
                return
            self._emit_key(
                EventKind.RETRYING, key, delay_ms=ms_ceil(decision.delay_s), reason="one retry"
            )
            self._spawn_task(
                self._respawn_after, key, incarnation.spec, decision.delay_s, self._starts[key]
            )
        elif isinstance(decision, MarkUnavailable):
            self._unavailable.add(key)
            self._emit_key(
                EventKind.UNAVAILABLE,
                key,
                reason="crashed twice within the recovery window",
                retry_after_ms=decision.retry_after_ms,
            )

    async def _respawn_after(
        self, key: BackendKey, spec: ServiceSpec, delay_s: float, starts: int
    ) -> None:
        """The one retry of a crashed backend: respawn after the back-off, no client needed.

        ``starts`` is the key's start count at the crash: if anything started the key
        since (a Hello did not wait for the back-off), the retry has been used.

        Cancellation: nothing is started when cancelled during the back-off.
        """
        await trio.sleep(delay_s)
        if self._stopping or self._starts.get(key) != starts or key.service_name in self._held:
            return  # a Hello already started one, an operator stopped it, or the broker stops
        self._start(key, spec)  # not budgeted: the recovery policy bounds retries

    def _emit_key(
        self, kind: EventKind, key: BackendKey, *, reason: str = "", **details: Any
    ) -> None:
        self._events.emit(
            kind,
            service_name=key.service_name,
            service_version=key.service_version,
            reason=reason,
            **details,
        )

    # -- idle ---------------------------------------------------------------------------

    def _track_idle(self, incarnation: Incarnation) -> None:
        now = trio.current_time()
        timeout = incarnation.spec.idle_timeout_secs
        due_before = self._idle.next_due_at()
        self._idle.mark_activity(incarnation, now, timeout)
        if due_before is None or now + timeout < due_before:
            self._idle_changed.set()

    async def quiesce_idle(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Quiesce incarnations idle past their timeout, for as long as the broker runs.

        Sleeps until the idle tracker's next due time, woken early when a backend
        starts that falls due sooner. A due backend with open connections is
        tracked again (it is not idle, only quiet on the control channel).

        Cancellation: ends the loop; a quiesce already sent stays sent.
        """
        task_status.started()
        while True:
            due_at = self._idle.next_due_at()
            changed = self._idle_changed = trio.Event()
            with trio.move_on_at(math.inf if due_at is None else due_at):
                await changed.wait()
            if changed.is_set():
                continue
            for due in self._idle.collect_due(trio.current_time()):
                self._quiesce_if_idle(due)

    def _quiesce_if_idle(self, due: IdleDue[Incarnation]) -> None:
        incarnation = due.key
        if not incarnation.routable:
            return
        if incarnation.open_connections > 0:
            self._track_idle(incarnation)
            return
        self._events.emit(
            EventKind.IDLE_QUIESCE,
            service_name=incarnation.key.service_name,
            service_version=incarnation.key.service_version,
            pid=incarnation.pid,
            idle_for_ms=ms_ceil(due.idle_for_s),
        )
        self._spawn_task(self._quiesce_one, incarnation, QuiesceReason.IDLE_TIMEOUT)

    async def _quiesce_one(self, incarnation: Incarnation, reason: QuiesceReason) -> None:
        await self.broadcast(Quiesce(reason), targets=[incarnation])

    # -- broadcast ----------------------------------------------------------------------

    async def broadcast(
        self,
        operation: BroadcastOperation,
        *,
        ack_timeout_s: float | None = None,
        targets: list[Incarnation] | None = None,
        drain_deadline: float | None = None,
    ) -> BroadcastResult[Incarnation]:
        """Send ``operation`` to every live incarnation (or ``targets``) concurrently.

        Each is bounded by one shared ACK deadline, so the call takes about the
        slowest ACK, not the sum. A quiesce makes its targets unroutable at once
        and bounds them by ``drain_deadline`` (default: now + the drain timeout).
        The result is also emitted as a BROADCAST_RESULT event.

        Cancellation: abandons the outstanding waits; late ACKs are ignored.
        """
        timeout = self._config.broadcast_ack_timeout_s if ack_timeout_s is None else ack_timeout_s
        chosen = list(self) if targets is None else targets
        now = trio.current_time()
        result = await fanout.fan_out(
            chosen,
            operation,
            ack_timeout_s=timeout,
            drain_deadline=now + self._config.drain_timeout_s
            if drain_deadline is None
            else drain_deadline,
        )
        self._events.emit(EventKind.BROADCAST_RESULT, **result.to_json())
        return result

    # -- stopping -----------------------------------------------------------------------

    async def stop_all(self, drain_deadline: float) -> None:
        """Stop every incarnation: quiesce the running, cancel the starting, wait for all.

        Running (and draining) incarnations are quiesced with ``drain_deadline``
        (the ACK wait runs inside it, never before it); the lifecycle then
        escalates to SIGTERM at the deadline and SIGKILL after the grace. Partial
        spawns are killed. New Hellos are refused with SHUTTING_DOWN from now on.

        Cancellation: stops waiting; ``release`` then kills what is left.
        """
        self._stopping = True
        live = list(self)
        serving: list[Incarnation] = []
        for incarnation in live:
            if incarnation.lifecycle.starting:
                incarnation.stop(StopCause.BROKER_SHUTDOWN)
            elif not incarnation.exited.is_set():
                serving.append(incarnation)
        now = trio.current_time()
        async with trio.open_nursery() as nursery:
            if serving:
                nursery.start_soon(
                    self._broadcast_shutdown,
                    serving,
                    min(self._config.broadcast_ack_timeout_s, max(0.0, drain_deadline - now)),
                    drain_deadline,
                )
            for incarnation in live:
                await incarnation.ended.wait()
            nursery.cancel_scope.cancel()

    async def _broadcast_shutdown(
        self, targets: list[Incarnation], ack_timeout_s: float, drain_deadline: float
    ) -> None:
        await self.broadcast(
            Quiesce(QuiesceReason.BROKER_SHUTDOWN),
            ack_timeout_s=ack_timeout_s,
            targets=targets,
            drain_deadline=drain_deadline,
        )

    def kill_all(self) -> None:
        """Kill every live incarnation now (a forced stop)."""
        self._stopping = True
        for incarnation in self:
            incarnation.kill()

    # -- one service (operators) ------------------------------------------------------------

    def of_service(self, service_name: str) -> list[Incarnation]:
        """Live incarnations of ``service_name`` (every version and instance)."""
        return [i for i in self if i.key.service_name == service_name]

    def is_held(self, service_name: str) -> bool:
        """Whether an operator stopped ``service_name`` (Hellos refused until a restart)."""
        return service_name in self._held

    async def stop_service(self, service_name: str, grace_s: float) -> list[StoppedBackend]:
        """Stop every backend of ``service_name`` and refuse its Hellos until a restart.

        Each backend gets SIGTERM (to its group) at once and SIGKILL ``grace_s``
        later if still alive; one that is starting is killed. Its exit is an
        operator's stop, not a crash: no recovery retry follows. Waits until they
        have ended, bounded by the grace plus the reap bound.

        Cancellation: stops waiting; the stop goes on.
        """
        self._held.add(service_name)
        targets = self.of_service(service_name)
        for incarnation in targets:
            incarnation.stop(StopCause.REQUESTED, grace_s=grace_s)
        with trio.move_on_after(grace_s + REAP_TIMEOUT_S + STOP_WAIT_SLACK_S):
            for incarnation in targets:
                await incarnation.ended.wait()
        await trio.lowlevel.checkpoint()
        return [
            StoppedBackend(
                service_version=i.key.service_version,
                instance=i.key.instance,
                pid=i.pid,
                state=i.status,
                exit_status=None if i.process is None else i.process.returncode,
            )
            for i in targets
        ]

    async def restart_service(self, service_name: str, grace_s: float) -> list[StoppedBackend]:
        """``stop_service``, then let the next Hello start a fresh backend.

        The fresh backend uses the service's definition as it is then (an edited
        definition takes effect), and the service's crash record is forgotten, so
        a service marked unavailable after crashes is tried again at once.

        Cancellation: stops waiting; the stop goes on and the service stays held
        until a restart completes.
        """
        stopped = await self.stop_service(service_name, grace_s)
        self._held.discard(service_name)
        for key in [k for k in self._crashed | self._unavailable if k.service_name == service_name]:
            self._crashed.discard(key)
            self._unavailable.discard(key)
            self._recovery.record_success(key)
        return stopped

    async def quiesce_service(
        self, service_name: str, *, ack_timeout_s: float | None = None
    ) -> BroadcastResult[Incarnation]:
        """Quiesce (maintenance) the backends of ``service_name`` only; they drain and exit.

        They leave service at once, so the next Hello starts a fresh backend.

        Cancellation: abandons the outstanding ACK waits (see ``broadcast``).
        """
        return await self.broadcast(
            Quiesce(QuiesceReason.MAINTENANCE),
            ack_timeout_s=ack_timeout_s,
            targets=self.of_service(service_name),
        )
