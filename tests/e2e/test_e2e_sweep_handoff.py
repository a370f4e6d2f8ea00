"""One handoff attempt (``HandoffCoordinator.deliver``) cut at every step.

A running broker with one backend serves the whole sweep; each run plans one
attempt with the broker's own coordinator (``HandoffCoordinator.plan``: a
registered token, an ACK deadline, an attempt in flight), builds the client's
connection as a socket pair, and delivers the plan, cut after each step of every
task of the program (the broker's link reader and, for fakes, the backend
too). Backends: the real SDK echo backend (adopts), the SDK refusing an offer
whose adoption deadline has passed, and a raw backend that never acknowledges;
then the testing kit's fakes under ``MockClock`` (adopt, reject, never-ack).

After every run: the coordinator holds no token and no pending ACK, the link no
waiting reply, and this process no new descriptor or task. Every attempt is
announced exactly once (a HANDOFF_COMPLETED or HANDOFF_FALLBACK event), and a
cancelled one as ``cancelled`` (unless the backend's answer reached the broker
first), which the failed-attempt budget does not charge:
with an adopting backend, after all the sweep's cancelled attempts (far more
than the budget's 8), a normal connect still gets the handoff route. An
uncancelled attempt ends as the backend decides (completed and the connection
echoes; rejected; ACK timeout).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import pytest
import trio

import rpbroker
import transports
from rpbroker.broker import response_frame
from rpbroker.events import EventKind
from rpbroker.handoff import (
    AttemptFailure,
    HandoffCompleted,
    HandoffCoordinator,
    HandoffFellBack,
    HandoffOutcome,
    HandoffPlan,
)
from rpbroker.policy.fallback import DEFAULT_MAX_FAILED_ATTEMPTS
from rpbroker.supervisor import Incarnation
from rpbroker.testing import (
    BuiltinChecks,
    CountedTasks,
    FakeBackend,
    FakeBackendScript,
    FakeService,
    HandoffBehaviour,
    Invariant,
    SampleSteps,
    assert_sweep_clean,
    open_test_broker,
    steps_from_environment,
)
from rpbroker.wire import HelloReply, Negotiated
from rpbroker.wire.frames import encode
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body
from rpbroker.wire.protocols import PayloadProtocol

from .support import Workspace, round_trip
from .sweep_support import own_task_steps

pytestmark = pytest.mark.sweep

#: Sampled cut points for ``make test``: an attempt takes 10 to 40 steps of the
#: whole program (the attempt's tasks, the link reader, in-process fakes).
SAMPLED = SampleSteps(every_up_to=8, stride=6)
#: A short ACK deadline, s, so an uncut attempt on a never-ack backend ends quickly.
ACK_DEADLINE_S = 0.3
#: Bound on one test, s.
TEST_GUARD_S = 600


class Backend(enum.Enum):
    """The backend of one sweep and what an uncut attempt ends with."""

    SDK_ADOPTS = "sdk-adopts"
    SDK_REFUSES_EXPIRED = "sdk-refuses-expired"
    RAW_NEVER_ACKS = "raw-never-acks"
    FAKE_ADOPTS = "fake-adopts"
    FAKE_REJECTS = "fake-rejects"
    FAKE_NEVER_ACKS = "fake-never-acks"

    @property
    def adopts(self) -> bool:
        return self in (Backend.SDK_ADOPTS, Backend.FAKE_ADOPTS)

    @property
    def uncut_failure(self) -> AttemptFailure | None:
        """The failure of an uncut attempt (``None``: it completes)."""
        if self.adopts:
            return None
        if self in (Backend.RAW_NEVER_ACKS, Backend.FAKE_NEVER_ACKS):
            return AttemptFailure.ACK_TIMEOUT
        return AttemptFailure.BACKEND_REJECTED


@attrs.define
class AttemptLedger:
    """What each run of the sweep did: the outcomes ``deliver`` returned, and cancellations."""

    returned: list[HandoffOutcome] = attrs.field(factory=list)
    cancelled: int = 0


def _reply_frame(plan: HandoffPlan, backend: Incarnation) -> bytes:
    """A framed ``Negotiated`` as the broker writes it before the pass."""
    negotiated = Negotiated(
        negotiated_protocol=1,
        daemon_version=backend.key.service_version,
        backend_pipe=backend.endpoint,
        handle_passed_token=plan.token.raw,
        connection_id=plan.correlation_id,
    )
    return response_frame(
        None,
        PayloadProtocol.CONTROL,
        encode(HelloReply(negotiated=negotiated)),
        deadline_unix_ms=plan.adopt_by_unix_ms,
    )


@attrs.define
class HeldByFake:
    """The descriptors a never-acking fake backend holds, against a per-run baseline."""

    fake: FakeBackend
    before: set[int] = attrs.field(factory=set)

    async def snapshot(self) -> None:
        """Before each run: the descriptors open now. Cancellation: nothing is held."""
        await trio.lowlevel.checkpoint()
        self.before = _open_fds()

    def only_held_descriptors_are_new(self) -> None:
        held = {
            stream.socket.fileno()
            for stream in self.fake.held_streams
            if isinstance(stream, trio.SocketStream)
        }
        new = _open_fds() - self.before
        assert new <= held, f"descriptors left open: {sorted(new - held)}"


async def prepare(held: HeldByFake | None, reset: Callable[[], Awaitable[None]] | None) -> None:
    """Before each run: the descriptor baseline and a fresh coordinator, where asked.

    Cancellation: nothing is held.
    """
    if held is not None:
        await held.snapshot()
    if reset is not None:
        await reset()
    await trio.lowlevel.checkpoint()


def _open_fds() -> set[int]:
    fds = transports.open_fds()
    assert fds is not None, "needs /proc or /dev/fd"
    return set(fds)


async def sweep_one_attempt(
    label: str,
    broker: rpbroker.Broker,
    backend: Incarnation,
    kind: Backend,
    held: HeldByFake | None = None,
) -> None:
    """Sweep ``deliver`` for ``kind``'s backend and check what the module docstring says."""
    # An adopting backend's attempts all go through the broker's own coordinator
    # (its budget must not be charged for cancellations); a failing backend's
    # spend a budget legitimately, so each run gets a fresh coordinator.
    coordinators = [broker.handoff]
    ledger = AttemptLedger()
    connection_ids = iter(range(1_000_000, 2_000_000))
    mark = len(broker.recent_events())

    async def fresh_coordinator() -> None:
        """Before each run of a failing backend. Cancellation: nothing is held."""
        await trio.lowlevel.checkpoint()
        coordinators.append(HandoffCoordinator(broker.config, broker.events, broker.metrics))

    async def one_attempt() -> None:
        coordinator = coordinators[-1]
        plan = coordinator.plan(
            client_opted_in=True,
            backend=backend,
            fd_pressure=False,
            connection_id=next(connection_ids),
            hello_deadline_unix_ms=0,
            now=trio.current_time(),
        )
        assert isinstance(plan, HandoffPlan), plan
        if kind is Backend.SDK_REFUSES_EXPIRED:
            plan = attrs.evolve(plan, adopt_by_unix_ms=int(time.time() * 1000) - 1)
        a, b = trio.socket.socketpair()
        client, connection = trio.SocketStream(a), trio.SocketStream(b)
        try:
            # Cancelled comes out of deliver's nursery in an exception group: count
            # every attempt that did not return instead (anything but Cancelled
            # fails the sweep anyway).
            ledger.cancelled += 1
            outcome = await coordinator.deliver(
                plan, connection, backend, _reply_frame(plan, backend), trio.Event()
            )
            ledger.cancelled -= 1
            ledger.returned.append(outcome)
            if isinstance(outcome, HandoffCompleted):
                # The client's connection works: the reply, the backend's
                # handoff-ready EVENT, then the backend echoes.
                await read_frame_body(client, MAX_FRAME_BYTES)
                await read_frame_body(client, MAX_FRAME_BYTES)
                assert await round_trip(client, b"adopted") == b"adopted"
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()
                await client.aclose()

    def nothing_pending() -> None:
        coordinator = coordinators[-1]
        assert len(coordinator.tokens) == 0, "a handoff token is still issued"
        assert len(coordinator.acks) == 0, "an ACK is still pending"
        assert backend.link is not None and backend.link.pending_requests == 0

    checks = BuiltinChecks.ALL
    invariants: list[Invariant] = [nothing_pending]
    if held is not None:
        # A never-acking fake keeps each connection passed to it (a dup in this
        # process) until it ends, as a real process would: those descriptors are
        # its own, every other new one is a leak.
        checks = BuiltinChecks.ALL & ~BuiltinChecks.FDS
        invariants.append(held.only_held_descriptors_are_new)
    report = await assert_sweep_clean(
        one_attempt,
        counted=CountedTasks.EVERY_TASK,
        steps=steps_from_environment(SAMPLED),
        invariants=invariants,
        prepare=functools.partial(prepare, held, None if kind.adopts else fresh_coordinator),
        checks=checks,
        settle=broker.wait_connections_closed,
    )
    # Attempts cancelled before their first checkpoint, one more than the whole
    # failed-attempt budget: nothing has reached the backend, so each is
    # announced as cancelled, whatever the machine's load.
    if not kind.adopts:
        await fresh_coordinator()
    for _ in range(DEFAULT_MAX_FAILED_ATTEMPTS + 1):
        with trio.CancelScope() as scope:
            scope.cancel()
            await one_attempt()
    events = [
        e
        for e in broker.recent_events()[mark:]
        if e.kind in (EventKind.HANDOFF_COMPLETED, EventKind.HANDOFF_FALLBACK)
    ]
    failures = collections.Counter(
        AttemptFailure(e.details["failure"]) for e in events if e.kind is EventKind.HANDOFF_FALLBACK
    )
    # Every attempt was announced exactly once. A cancelled one is announced as
    # cancelled unless the backend's answer was recorded before the cut reached
    # it (the first result wins: on a busy machine a real backend's answer can
    # win every sampled cut after the offer went out); no other failure comes
    # from a cancellation, so the budget is charged only for the backend's own.
    assert len(events) == len(ledger.returned) + ledger.cancelled
    assert DEFAULT_MAX_FAILED_ATTEMPTS < failures[AttemptFailure.CANCELLED] <= ledger.cancelled
    assert set(failures) <= {AttemptFailure.CANCELLED, kind.uncut_failure}, failures
    # The uncut runs (the warm-up and the last) ended as the backend decides.
    for outcome in (ledger.returned[0], ledger.returned[-1]):
        if kind.uncut_failure is None:
            assert isinstance(outcome, HandoffCompleted), outcome
        else:
            assert isinstance(outcome, HandoffFellBack), outcome
            assert outcome.failure is kind.uncut_failure, outcome
    if kind.adopts:
        # Cancelled attempts are not charged: after all of them (the sweep's and
        # more than the whole budget's at their first checkpoint) a normal
        # connect still gets the handoff route.
        async with rpbroker.connect(
            "svc", "1.0.0", broker=broker.socket_path, hello_skip=False
        ) as stream:
            assert stream.route is rpbroker.Route.HANDOFF
            assert await round_trip(stream, b"after") == b"after"
    cancelled = ledger.cancelled
    own = await own_task_steps(
        one_attempt,
        invariants=invariants,
        prepare=functools.partial(prepare, held, None if kind.adopts else fresh_coordinator),
        checks=checks,
        settle=broker.wait_connections_closed,
    )
    print(
        f"{label}: {own} steps uncancelled (own task), {report.total_steps} (every task); "
        f"{len(report.cut_runs)} cut runs; {cancelled} attempts cancelled; "
        f"fallbacks { ({f.value: n for f, n in failures.items()}) }"
    )


@contextlib.asynccontextmanager
async def _running_backend(
    broker: rpbroker.Broker,
) -> AsyncIterator[Incarnation]:
    """Start the backend with one reconnect-route connection; yield its incarnation."""
    async with rpbroker.connect(
        "svc", "1.0.0", broker=broker.socket_path, handoff=False, hello_skip=False
    ) as stream:
        assert await round_trip(stream, b"start") == b"start"
    await broker.wait_connections_closed()
    [backend] = list(broker.backends)
    yield backend


@pytest.mark.parametrize(
    "kind",
    [Backend.SDK_ADOPTS, Backend.SDK_REFUSES_EXPIRED, Backend.RAW_NEVER_ACKS],
    ids=lambda k: k.value,
)
async def test_one_attempt_to_a_real_backend_is_clean_wherever_it_is_cancelled(
    workspace: Workspace, kind: Backend
) -> None:
    workspace.add_service("svc", mode="never-ack" if kind is Backend.RAW_NEVER_ACKS else "echo")
    config = workspace.config(ack_deadline_s=ACK_DEADLINE_S)
    async with rpbroker.open_broker(config) as broker, _running_backend(broker) as backend:
        with trio.fail_after(TEST_GUARD_S):
            await sweep_one_attempt(kind.value, broker, backend, kind)


_FAKE_BEHAVIOUR = {
    Backend.FAKE_ADOPTS: HandoffBehaviour.ADOPT,
    Backend.FAKE_REJECTS: HandoffBehaviour.REJECT,
    Backend.FAKE_NEVER_ACKS: HandoffBehaviour.NEVER_ACK,
}


@pytest.mark.parametrize("kind", list(_FAKE_BEHAVIOUR), ids=lambda k: k.value)
async def test_one_attempt_to_a_fake_backend_is_clean_wherever_it_is_cancelled(
    autojump_clock: trio.testing.MockClock, kind: Backend
) -> None:
    # Virtual time runs on through the sweep's ACK timeouts: no idle quiesce.
    service = FakeService(
        script=FakeBackendScript(handoff=_FAKE_BEHAVIOUR[kind]), idle_timeout_secs=1e9
    )
    async with (
        open_test_broker(services={"svc": service}) as test_broker,
        _running_backend(test_broker.broker) as backend,
    ):
        held = None
        if kind is Backend.FAKE_NEVER_ACKS:
            held = HeldByFake(test_broker.launcher.backend("svc"))
        await sweep_one_attempt(kind.value, test_broker.broker, backend, kind, held)
