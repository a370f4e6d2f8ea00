"""Backend supervision: the live registry, single-flight spawns, readiness and crash recovery.

What this module does: owns every backend process the broker started. For a
(instance, service, version) key it finds the running backend or starts exactly
one spawn that concurrent Hellos share; the spawn runs as a child task of the
broker, so a client that leaves cancels only its own wait. Each backend gets a
fresh endpoint and a persistent control channel created before the spawn; a
reader task dispatches the backend's messages (ready, activity, handoff ACKs,
broadcast ACKs) and a waiter task notices its exit at once. An unexpected exit
goes through the crash-recovery policy: one retry after the back-off with no
client needed, then an honest "unavailable" until the window ends. Lifecycle
broadcasts fan out concurrently, each bounded by its own ACK timeout.

What it does not do: decide policy (``rpbroker.policy`` does, given ``now``),
speak to clients, or choose the platform (``transports`` does).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVarTuple, Unpack

import attrs
import trio

import transports
from rpbroker import control
from rpbroker._scopes import cancel_when_set
from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog
from rpbroker.launcher import BackendLauncher, LaunchRequest, ProcessLauncher
from rpbroker.policy.ack import BackendRef
from rpbroker.policy.broadcast import (
    BackendAcked,
    BackendFailed,
    BackendSkippedDead,
    BackendTimedOut,
    BroadcastCollector,
    BroadcastFailure,
    BroadcastOperation,
    BroadcastOutcome,
    BroadcastPolicy,
    BroadcastResult,
    Quiesce,
    QuiesceReason,
)
from rpbroker.policy.hello import Refusal
from rpbroker.policy.idle import IdleTracker
from rpbroker.policy.recovery import CrashRecovery, MarkUnavailable, RetryAfterBackoff
from rpbroker.policy.spawn_budget import (
    BudgetExhausted,
    SpawnBudget,
    SpawnInProgress,
    SpawnOutcome,
)
from rpbroker.policy.spawn_wait import (
    DaemonExitedBeforeReady,
    EndpointReady,
    SpawnWaitPolicy,
    SpawnWaitTimeout,
)
from rpbroker.services import ServiceSpec
from rpbroker.wire.codes import RefusalCode
from rpbroker.wire.framing import MAX_FRAME_BYTES

logger = logging.getLogger("rpbroker.backends")

PosArgsT = TypeVarTuple("PosArgsT")

#: retry_after for a failed spawn, ms (facts §5.6: 1000 ms).
SPAWN_FAILED_RETRY_AFTER_MS = 1000
#: How long a broadcast waits to learn whether a backend whose channel closed has
#: exited (reported as dead) or not (reported as failed), seconds.
EXIT_CONFIRM_S = 0.1
#: Grace between SIGTERM and SIGKILL when a backend must be stopped without a quiesce, s.
TERMINATE_GRACE_S = 1.0


class BackendState(enum.Enum):
    SPAWNING = "spawning"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@attrs.frozen
class BackendKey:
    """Identity of a backend in the registry."""

    instance: str
    service_name: str
    service_version: str


@attrs.define(eq=False)
class BackendHandle:
    """One backend incarnation and everything the broker holds for it."""

    key: BackendKey
    spec: ServiceSpec
    endpoint: str
    state: BackendState = BackendState.SPAWNING
    process: transports.ChildProcess | None = None
    channel: transports.ControlChannel | None = None
    pid: int = 0
    failure: str = ""
    expected_exit: bool = False
    adopted: bool = False
    open_connections: int = 0
    last_active_unix_ms: int = attrs.field(factory=lambda: int(time.time() * 1000))
    started_at_unix_ms: int = attrs.field(factory=lambda: int(time.time() * 1000))
    settled: trio.Event = attrs.field(factory=trio.Event)
    exited: trio.Event = attrs.field(factory=trio.Event)
    ready: trio.Event = attrs.field(factory=trio.Event)
    #: Set once the supervisor has fully processed the exit (events, recovery).
    finished: trio.Event = attrs.field(factory=trio.Event)
    handoff_waiters: dict[int, trio.MemorySendChannel[control.HandoffReply]] = attrs.field(
        factory=dict
    )
    broadcast_waiters: dict[int, trio.MemorySendChannel[control.BroadcastReply]] = attrs.field(
        factory=dict
    )

    @property
    def ref(self) -> BackendRef:
        return BackendRef(service_name=self.key.service_name, pid=self.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.exited.is_set()

    def to_json(self) -> dict[str, object]:
        return {
            "service_name": self.key.service_name,
            "service_version": self.key.service_version,
            "instance": self.key.instance,
            "pid": self.pid,
            "backend_pipe": self.endpoint,
            "state": self.state.value,
            "open_connections": self.open_connections,
            "last_active_unix_ms": self.last_active_unix_ms,
            "started_at_unix_ms": self.started_at_unix_ms,
        }


class BackendSupervisor:
    """The registry of live backends and the tasks that keep it true.

    All methods run in the broker's trio thread. ``run`` must be started with
    ``nursery.start`` before any other method is used; it hosts the per-backend
    tasks, so they outlive the Hello that caused them.
    """

    def __init__(
        self,
        config: BrokerConfig,
        events: EventLog,
        launcher: BackendLauncher | None = None,
        on_spawn: Callable[[BackendKey, SpawnOutcome], None] | None = None,
    ) -> None:
        self._config = config
        self._on_spawn = on_spawn
        self._launcher: BackendLauncher = launcher or ProcessLauncher()
        self._events = events
        self._backends: dict[BackendKey, BackendHandle] = {}
        self._nursery: trio.Nursery | None = None
        self._spawn_budget = SpawnBudget(config.spawn_attempts_per_window, config.spawn_window_s)
        self._spawn_wait = SpawnWaitPolicy(ceiling_s=config.spawn_ready_timeout_s)
        self._recovery = CrashRecovery(config.recovery_backoff_s, config.recovery_window_s)
        self.idle = IdleTracker()
        self._operation_ids = itertools.count(1)
        self._stopping = False
        self._closed = trio.Event()
        # Idle quiesce loop: when it wakes next, and how to wake it earlier.
        self._idle_wake_at = math.inf
        self._idle_changed = trio.Event()

    # -- lifecycle --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host backend tasks until ``close``; on the way out kill every backend.

        Cancellation: shielded. Backends are supervised until the broker has
        finished its graceful stop and calls ``close`` (an outer cancellation must
        not kill them before they were asked to drain). Then every child process
        is killed as a group and reaped and every control channel closed, so
        nothing outlives the broker. The caller must call ``close`` in a
        ``finally``.
        """
        try:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await self._closed.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._kill_all()

    def close(self) -> None:
        """End ``run``: cancel every backend task (their processes are killed)."""
        self._stopping = True
        self._closed.set()

    def _spawn_task(
        self, fn: Callable[[Unpack[PosArgsT]], Awaitable[object]], *args: *PosArgsT
    ) -> None:
        """Start a supervisor-owned task (it outlives the Hello that caused it)."""
        if self._nursery is None:
            raise RuntimeError("backend supervisor is not running")
        self._nursery.start_soon(fn, *args)

    async def _kill_all(self) -> None:
        for handle in list(self._backends.values()):
            handle.expected_exit = True
            if handle.process is not None:
                handle.process.kill_tree()
        for handle in list(self._backends.values()):
            await self._reap(handle)
        self._backends.clear()

    async def _reap(self, handle: BackendHandle) -> None:
        if handle.process is not None and handle.process.returncode is None:
            with trio.move_on_after(TERMINATE_GRACE_S * 5):
                await handle.process.wait()
        if handle.channel is not None:
            await handle.channel.aclose()
        _discard_endpoint(handle.endpoint)

    # -- queries ------------------------------------------------------------------

    def __iter__(self) -> Iterator[BackendHandle]:
        return iter(list(self._backends.values()))

    def get(self, key: BackendKey) -> BackendHandle | None:
        return self._backends.get(key)

    def running(self, key: BackendKey) -> BackendHandle | None:
        """The running backend for ``key``, if any (no waiting)."""
        handle = self._backends.get(key)
        return handle if handle is not None and handle.state is BackendState.RUNNING else None

    def note_routed(self, handle: BackendHandle, now: float) -> None:
        """A client is being routed to ``handle``: that is activity for idle tracking."""
        handle.last_active_unix_ms = int(time.time() * 1000)
        if handle.state is BackendState.RUNNING:
            self._mark_active(handle, now)

    def spawn_budget_rows(self, now: float) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for key in self._spawn_budget.keys():  # noqa: SIM118 - SpawnBudget is not iterable
            snap = self._spawn_budget.snapshot(key, now)
            assert isinstance(key, BackendKey)
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
                    else int(snap.retry_after_s * 1000),
                }
            )
        return rows

    # -- find or start --------------------------------------------------------------

    async def acquire(self, key: BackendKey, spec: ServiceSpec) -> BackendHandle | Refusal:
        """Return the running backend for ``key``, starting one if needed.

        Concurrent callers for the same key share one spawn. Returns a ``Refusal``
        when the key is unavailable after crashes, the spawn budget is spent, or
        the spawn failed.

        Cancellation: cancelling this call abandons only the caller's wait; a
        spawn in progress goes on for the other waiters (it runs in the
        supervisor's nursery).
        """
        while True:
            handle = self._backends.get(key)
            if handle is not None and handle.state is BackendState.RUNNING:
                return handle
            if handle is not None and handle.state is BackendState.SPAWNING:
                await handle.settled.wait()
                settled = _state_of(handle)
                if settled is BackendState.RUNNING:
                    return handle
                if settled is BackendState.FAILED:
                    return _spawn_failed(handle.failure)
                continue
            if handle is not None:
                # Draining or stopped but not yet removed: wait for it to leave.
                await handle.exited.wait()
                self._drop(handle)
                continue
            now = trio.current_time()
            unavailable = self._recovery.unavailable(key, now)
            if unavailable is not None:
                return Refusal(
                    RefusalCode.BACKEND_SPAWN_FAILED,
                    "backend crashed twice within the recovery window and is unavailable",
                    _ms(unavailable.retry_after_s),
                )
            decision = self._spawn_budget.try_begin(key, now)
            if isinstance(decision, BudgetExhausted):
                return Refusal(
                    RefusalCode.RATE_LIMITED,
                    "backend spawn budget exhausted",
                    _ms(decision.retry_after_s),
                )
            if isinstance(decision, SpawnInProgress):  # pragma: no cover - guarded by the table
                return Refusal(RefusalCode.RATE_LIMITED, "backend spawn already in progress", 1000)
            handle = self._new_handle(key, spec)
            self._spawn_task(self._run_backend, handle, True)

    def _new_handle(self, key: BackendKey, spec: ServiceSpec) -> BackendHandle:
        endpoint = transports.new_backend_endpoint(self._config.runtime_dir)
        handle = BackendHandle(key=key, spec=spec, endpoint=endpoint)
        self._backends[key] = handle
        return handle

    def _drop(self, handle: BackendHandle) -> None:
        if self._backends.get(handle.key) is handle:
            del self._backends[handle.key]
        self.idle.remove(handle.key)

    # -- one backend's life ----------------------------------------------------------

    async def _run_backend(self, handle: BackendHandle, budgeted: bool) -> None:
        key = handle.key
        self._events.emit(
            EventKind.SPAWNING,
            service_name=key.service_name,
            service_version=key.service_version,
            endpoint=handle.endpoint,
        )
        try:
            async with trio.open_nursery() as nursery:
                started = await self._start(handle, nursery)
                if self._on_spawn is not None:
                    self._on_spawn(key, SpawnOutcome.SUCCEEDED if started else SpawnOutcome.FAILED)
                if budgeted:
                    self._spawn_budget.finish(
                        key,
                        SpawnOutcome.SUCCEEDED if started else SpawnOutcome.FAILED,
                        trio.current_time(),
                    )
                handle.settled.set()
                if not started:
                    nursery.cancel_scope.cancel()
                    return
                handle.state = BackendState.RUNNING
                self._mark_active(handle, trio.current_time())
                self._events.emit(
                    EventKind.RUNNING,
                    service_name=key.service_name,
                    service_version=key.service_version,
                    pid=handle.pid,
                    endpoint=handle.endpoint,
                )
                nursery.start_soon(self._verify_healthy, handle)
                await handle.exited.wait()
                nursery.cancel_scope.cancel()
        finally:
            handle.settled.set()
            with trio.CancelScope(shield=True):
                if handle.process is not None and handle.process.returncode is None:
                    # Leaving while it runs (broker cancelled): we stop it ourselves.
                    handle.expected_exit = True
                    handle.process.kill_tree()
                await self._reap(handle)
                handle.exited.set()
                self._fail_waiters(handle)
                self._after_exit(handle)
                handle.finished.set()

    async def _start(self, handle: BackendHandle, nursery: trio.Nursery) -> bool:
        """Spawn the process and wait until it reports ready, exits, or the ceiling passes."""
        key = handle.key
        request = LaunchRequest(
            service_name=key.service_name,
            service_version=key.service_version,
            instance=key.instance,
            endpoint=handle.endpoint,
            spec=handle.spec,
            extra_env=self._config.backend_env,
        )
        try:
            launched = await self._launcher.launch(request)
        except (transports.SpawnError, OSError) as exc:
            # OSError: e.g. EMFILE creating the control channel under fd pressure.
            return self._spawn_failure(handle, f"backend spawn failed: {exc}")
        handle.process, handle.channel = launched.process, launched.channel
        handle.pid = handle.process.pid
        nursery.start_soon(self._wait_exit, handle)
        nursery.start_soon(self._read_control, handle)
        started_at = trio.current_time()
        with trio.move_on_after(self._config.spawn_ready_timeout_s):
            async with trio.open_nursery() as race:
                race.start_soon(cancel_when_set, handle.ready, race.cancel_scope)
                race.start_soon(cancel_when_set, handle.exited, race.cancel_scope)
        decision = self._spawn_wait.decide(
            elapsed_s=trio.current_time() - started_at,
            daemon_alive=not handle.exited.is_set(),
            endpoint_ready=handle.ready.is_set(),
            attempt=0,
        )
        if isinstance(decision, EndpointReady):
            return True
        if isinstance(decision, DaemonExitedBeforeReady):
            if self._stopping:
                return self._spawn_failure(handle, "backend spawn cancelled: broker shutting down")
            status = handle.process.returncode
            return self._spawn_failure(
                handle, f"backend spawn failed: exited with status {status} before becoming ready"
            )
        assert isinstance(decision, SpawnWaitTimeout | object)
        handle.process.kill_tree()
        return self._spawn_failure(
            handle,
            f"backend spawn failed: not ready within {self._config.spawn_ready_timeout_s:g} s",
        )

    def _spawn_failure(self, handle: BackendHandle, reason: str) -> bool:
        handle.state = BackendState.FAILED
        handle.failure = reason
        handle.expected_exit = True
        self._events.emit(
            EventKind.SPAWN_FAILED,
            service_name=handle.key.service_name,
            service_version=handle.key.service_version,
            pid=handle.pid,
            reason=reason,
        )
        return False

    async def _wait_exit(self, handle: BackendHandle) -> None:
        assert handle.process is not None
        await handle.process.wait()
        handle.exited.set()

    async def _read_control(self, handle: BackendHandle) -> None:
        channel = handle.channel
        assert channel is not None
        try:
            while True:
                message = await channel.receive_message(MAX_FRAME_BYTES)
                if message.passed is not None:
                    await message.passed.stream.aclose()
                try:
                    inbound = control.parse(message.framed)
                except control.ControlMessageError as exc:
                    logger.warning("backend %s sent a bad control message: %s", handle.pid, exc)
                    continue
                self._dispatch(handle, inbound)
        except (transports.ChannelClosedError, transports.ChannelProtocolError):
            pass
        finally:
            self._fail_waiters(handle)

    def _dispatch(self, handle: BackendHandle, inbound: control.Inbound) -> None:
        if isinstance(inbound, control.ReadyNotice):
            handle.ready.set()
        elif isinstance(inbound, control.ActivityNotice):
            handle.open_connections = inbound.open_connections
            handle.last_active_unix_ms = int(time.time() * 1000)
            if handle.state is BackendState.RUNNING:
                self._mark_active(handle, trio.current_time())
        elif isinstance(inbound, control.HandoffReply):
            waiter = handle.handoff_waiters.pop(inbound.correlation_id, None)
            if waiter is not None:
                waiter.send_nowait(inbound)
        elif isinstance(inbound, control.BroadcastReply):
            reply_to = handle.broadcast_waiters.pop(inbound.operation_id, None)
            if reply_to is not None:
                reply_to.send_nowait(inbound)

    def _fail_waiters(self, handle: BackendHandle) -> None:
        for handoff_waiter in handle.handoff_waiters.values():
            handoff_waiter.close()
        handle.handoff_waiters.clear()
        for broadcast_waiter in handle.broadcast_waiters.values():
            broadcast_waiter.close()
        handle.broadcast_waiters.clear()

    async def _verify_healthy(self, handle: BackendHandle) -> None:
        """A backend that stays up for a whole recovery window clears its crash record."""
        await trio.sleep(self._config.recovery_window_s)
        if handle.alive:
            self._recovery.record_success(handle.key)

    def _after_exit(self, handle: BackendHandle) -> None:
        key = handle.key
        self._drop(handle)
        if handle.state is BackendState.FAILED:
            return
        status = handle.process.returncode if handle.process is not None else None
        if handle.expected_exit or self._stopping:
            handle.state = BackendState.STOPPED
            self._events.emit(
                EventKind.STOPPED,
                service_name=key.service_name,
                service_version=key.service_version,
                pid=handle.pid,
                status=status,
            )
            return
        handle.state = BackendState.FAILED
        decision = self._recovery.record_crash(key, trio.current_time())
        self._events.emit(
            EventKind.CRASHED,
            service_name=key.service_name,
            service_version=key.service_version,
            pid=handle.pid,
            reason=f"exited unexpectedly with status {status}",
            status=status,
        )
        if isinstance(decision, RetryAfterBackoff):
            self._spawn_task(self._respawn_after, key, handle.spec, decision.delay_s)
        elif isinstance(decision, MarkUnavailable):
            self._events.emit(
                EventKind.UNAVAILABLE,
                service_name=key.service_name,
                service_version=key.service_version,
                reason="crashed twice within the recovery window",
                retry_after_ms=_ms(decision.retry_after_s),
            )

    async def _respawn_after(self, key: BackendKey, spec: ServiceSpec, delay_s: float) -> None:
        self._events.emit(
            EventKind.RETRYING,
            service_name=key.service_name,
            service_version=key.service_version,
            delay_ms=_ms(delay_s),
        )
        await trio.sleep(delay_s)
        if self._stopping or key in self._backends:
            return
        handle = self._new_handle(key, spec)
        await self._run_backend(handle, False)

    # -- broadcast ----------------------------------------------------------------------

    async def broadcast(
        self,
        operation: BroadcastOperation,
        *,
        ack_timeout_s: float | None = None,
        targets: list[BackendHandle] | None = None,
        drain_deadline_ms: int = 0,
    ) -> BroadcastResult:
        """Send ``operation`` to every live backend (or ``targets``) concurrently.

        Each backend is bounded by its own ACK timeout, so the whole call takes
        about the slowest timeout, not the sum. Dead backends are skipped and
        reported. A quiesce marks its targets as expected to exit.

        Cancellation: cancelling abandons the outstanding waits; their waiter
        slots are removed and late ACKs are ignored.
        """
        timeout = self._config.broadcast_ack_timeout_s if ack_timeout_s is None else ack_timeout_s
        chosen = list(self) if targets is None else targets
        collector = BroadcastCollector(operation, chosen, BroadcastPolicy(timeout))
        # One deadline for all: the fan-out ends at the ACK timeout, however many
        # backends there are and however late each task starts.
        deadline = trio.current_time() + timeout

        async def one(handle: BackendHandle) -> None:
            collector.record(
                await self._send_one(handle, operation, timeout, deadline, drain_deadline_ms)
            )

        async with trio.open_nursery() as nursery:
            for handle in chosen:
                nursery.start_soon(one, handle)
        result = collector.result()
        self._events.emit(EventKind.BROADCAST_RESULT, **result.to_json())
        return result

    async def _send_one(
        self,
        handle: BackendHandle,
        operation: BroadcastOperation,
        timeout_s: float,
        deadline: float,
        drain_deadline_ms: int,
    ) -> BroadcastOutcome:
        ref = handle
        channel = handle.channel
        if not handle.alive or channel is None or handle.state is not BackendState.RUNNING:
            return BackendSkippedDead(ref)
        if isinstance(operation, Quiesce):
            handle.expected_exit = True
            handle.state = BackendState.DRAINING
            self.idle.mark_draining(handle.key)
            if not self._stopping:  # during shutdown, stop_all enforces the drain bound
                # Whatever the backend answers (or not), it is gone within the drain
                # bound: a draining backend that never exits would block its key.
                drain_s = (
                    drain_deadline_ms / 1000 if drain_deadline_ms else self._config.drain_timeout_s
                )
                self._spawn_task(self._kill_after_drain, handle, drain_s)
            self._events.emit(
                EventKind.DRAINING,
                service_name=handle.key.service_name,
                service_version=handle.key.service_version,
                pid=handle.pid,
                reason=operation.reason.value,
            )
        operation_id = next(self._operation_ids)
        send, receive = trio.open_memory_channel[control.BroadcastReply](1)
        handle.broadcast_waiters[operation_id] = send
        try:
            with trio.move_on_at(deadline):
                try:
                    await channel.send_message(
                        control.broadcast_command(operation_id, operation, drain_deadline_ms)
                    )
                    reply = await receive.receive()
                except (transports.TransportError, trio.EndOfChannel, trio.BrokenResourceError):
                    # The channel's EOF can precede the exit notification by a moment.
                    with trio.move_on_after(EXIT_CONFIRM_S):
                        await handle.exited.wait()
                    if handle.exited.is_set():
                        return BackendSkippedDead(ref)
                    return BackendFailed(
                        ref, BroadcastFailure.BACKEND_ERROR, "control channel failed"
                    )
                if reply.failure is None:
                    return BackendAcked(ref)
                return BackendFailed(ref, reply.failure, reply.detail)
            return BackendTimedOut(ref, timeout_s)
        finally:
            handle.broadcast_waiters.pop(operation_id, None)
            receive.close()

    async def quiesce_idle(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Quiesce backends idle past their timeout, for as long as the broker runs.

        Sleeps until the idle tracker's next due time, and is woken early when a
        backend starts that falls due sooner; activity pushes deadlines back.
        Cancellation: ends the loop; an in-flight quiesce broadcast is abandoned.
        """
        task_status.started()
        while True:
            due_at = self.idle.next_due_at()
            self._idle_wake_at = math.inf if due_at is None else due_at
            changed = self._idle_changed = trio.Event()
            with trio.move_on_at(self._idle_wake_at):
                await changed.wait()
            if changed.is_set():
                continue
            for due in self.idle.collect_due(trio.current_time()):
                assert isinstance(due.key, BackendKey)
                handle = self._backends.get(due.key)
                if handle is None or handle.open_connections > 0:
                    if handle is not None:
                        self._mark_active(handle, trio.current_time())
                    continue
                self._events.emit(
                    EventKind.IDLE_QUIESCE,
                    service_name=due.key.service_name,
                    service_version=due.key.service_version,
                    pid=handle.pid,
                    idle_for_ms=_ms(due.idle_for_s),
                )
                self._spawn_task(self._quiesce_one, handle, QuiesceReason.IDLE_TIMEOUT)

    def _mark_active(self, handle: BackendHandle, now: float) -> None:
        """Record activity; wake the idle loop if this backend now falls due sooner."""
        self.idle.mark_activity(handle.key, now, handle.spec.idle_timeout_secs)
        if now + handle.spec.idle_timeout_secs < self._idle_wake_at:
            self._idle_changed.set()

    async def _quiesce_one(self, handle: BackendHandle, reason: QuiesceReason) -> None:
        await self.broadcast(Quiesce(reason), targets=[handle])

    async def _kill_after_drain(self, handle: BackendHandle, drain_s: float) -> None:
        """Kill a quiesced backend that has not exited after ``drain_s`` seconds."""
        with trio.move_on_after(drain_s):
            await handle.exited.wait()
        if handle.process is not None and not handle.exited.is_set():
            handle.process.kill_tree()

    async def stop_all(self, drain_timeout_s: float) -> BroadcastResult:
        """Quiesce every backend, wait up to ``drain_timeout_s`` for them to exit, then kill.

        Cancellation: a cancelled stop leaves the remaining backends to ``run``'s
        shielded cleanup, which kills them.
        """
        self._stopping = True
        live = list(self)
        for handle in live:
            if handle.state is BackendState.SPAWNING:
                # A partial spawn is cancelled, not drained.
                handle.expected_exit = True
                if handle.process is not None:
                    handle.process.kill_tree()
        result = await self.broadcast(
            Quiesce(QuiesceReason.BROKER_SHUTDOWN),
            targets=[h for h in live if h.state is BackendState.RUNNING],
            drain_deadline_ms=int(drain_timeout_s * 1000),
        )
        with trio.move_on_after(drain_timeout_s):
            for handle in live:
                await handle.exited.wait()
        for handle in live:
            handle.expected_exit = True
            if handle.process is not None and not handle.exited.is_set():
                handle.process.kill_tree()
        for handle in live:
            await handle.finished.wait()
        return result


def _state_of(handle: BackendHandle) -> BackendState:
    """The handle's state now (a function, so type narrowing does not outlive an await)."""
    return handle.state


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _spawn_failed(reason: str) -> Refusal:
    return Refusal(RefusalCode.BACKEND_SPAWN_FAILED, reason, SPAWN_FAILED_RETRY_AFTER_MS)


def _discard_endpoint(endpoint: str) -> None:
    """Remove a dead backend's endpoint file, if the platform has one."""
    path = Path(endpoint)
    if path.is_absolute():
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
