"""The broker's embedding scope cut at every step while a client, outside the cut, is served.

Each run starts a real broker (``Broker.serve`` under ``nursery.start``, as
``serve_broker`` does) with a real backend process, starts one client in the
test's own nursery (so the cut never reaches it), waits for the client to end
and shuts the broker down. The sweep cuts the broker's scope after each step of
the whole run: during start-up, while the client's Hello is read, while it waits
for the spawn, while the handoff attempt waits for its ACK (a ``never-ack``
backend), while the client is served, and during the shutdown's drain of a
backend with a live connection. After every run: the client ended with its
request echoed, with a stream the shutdown then closed, or with a typed
``rpbroker.BrokerError``, within its bound (never hung); no request reached the
backend twice; the broker holds no token or pending ACK; its socket file is gone;
no descriptor, task or child process of this process is left. Each run returns
within its bound (the drain bound plus the terminate grace and reap bound).

Which part of the Hello path each cut landed in is read back from the broker's
own event log (``BrokerPhase``) and printed; every phase must have been cut.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
from pathlib import Path

import pytest
import trio

import rpbroker
from rpbroker.backend import Handler
from rpbroker.policy.lifecycle import DEFAULT_TERMINATE_GRACE_S
from rpbroker.supervisor.incarnation import REAP_TIMEOUT_S
from rpbroker.testing import (
    CountedTasks,
    FakeBackendScript,
    FakeLauncher,
    FakeService,
    HandoffBehaviour,
    SampleSteps,
    SweepDepth,
    assert_sweep_clean,
    steps_from_environment,
    sweep_depth_from_environment,
)

from .support import PendingHandoffs, Workspace, pending_handoffs
from .sweep_support import (
    CLIENT_BOUND_S,
    HELLO_PATH_PHASES,
    ClientEnd,
    OutsideClients,
    describe_phases,
    own_task_steps,
    phase_reached,
)

pytestmark = pytest.mark.sweep

#: Hellos per second the broker admits: far above what a sweep sends.
HELLO_RATE_LIMIT = 1_000_000
#: A short drain so a cut during serving shuts down promptly (the client's
#: connection is live, so the backend drains for real).
DRAIN_TIMEOUT_S = 2.0
#: The never-ack backend's ACK deadline and adoption window, s: short, so an
#: uncut run (ACK timeout, then the client's fallback after the window plus its
#: 0.5 s grace) takes about a second.
NEVER_ACK_TIMING = {"ack_deadline_s": 0.4, "handoff_adopt_window_s": 0.3}
#: Bound on one run, s: start-up, one client, a drain of DRAIN_TIMEOUT_S and the
#: broker's terminate grace and reap bound, with room for a loaded machine.
RUN_BOUND_S = 30.0
#: Sampled cut points for ``make test``: the whole run (the broker's tasks, the
#: supervisor's and the client's) takes about 75 steps, so about ten runs.
SAMPLED = SampleSteps(every_up_to=3, stride=11)
#: Bound on one test.
TEST_GUARD_S = 1800


async def open_client(socket_path: str, request: bytes) -> trio.abc.Stream:
    """The outside client's connect: the Hello path (no Hello-skip), ``request`` behind it."""
    return await rpbroker.open_connection(
        "svc", "1.0.0", broker=socket_path, hello_skip=False, initial_data=request
    )


async def sweep_hello_path(
    label: str,
    workspace: Workspace,
    config: rpbroker.BrokerConfig,
    received_log: Path,
    steps: SampleSteps,
    *,
    fake_script: FakeBackendScript | None = None,
    run_timeout_s: float | None = None,
) -> None:
    """Sweep the broker serving one outside client (real backends, or fakes of a script).

    Checks everything the module docstring lists and prints the summary line.
    """
    socket_file = Path(workspace.socket)
    brokers: list[rpbroker.Broker] = []
    launchers: list[FakeLauncher] = []

    async with trio.open_nursery() as outside:
        clients = OutsideClients(outside, received_log)

        async def broker_serving_one_client() -> None:
            async with contextlib.AsyncExitStack() as stack:
                launcher = None
                if fake_script is not None:
                    launcher = FakeLauncher(default=fake_script)
                    launchers.append(launcher)
                    await stack.enter_async_context(launcher)
                broker = rpbroker.Broker(config, launcher=launcher)
                brokers.append(broker)
                nursery = await stack.enter_async_context(trio.open_nursery())
                await nursery.start(broker.serve)
                record = clients.start(functools.partial(open_client, broker.socket_path))
                await record.done.wait()
                broker.request_shutdown()

        def broker_left_nothing() -> None:
            broker = brokers[-1]
            assert broker.stopping, "the broker did not stop"
            assert pending_handoffs(broker) == PendingHandoffs(tokens=0, acks=0)
            assert not socket_file.exists(), f"{socket_file} was left behind"
            if launchers:
                assert launchers[-1].backends == [], f"fakes left: {launchers[-1].backends}"

        report = await assert_sweep_clean(
            broker_serving_one_client,
            counted=CountedTasks.WHOLE_RUN,
            steps=steps_from_environment(steps),
            invariants=[clients.all_ended, clients.no_request_delivered_twice, broker_left_nothing],
            settle=clients.wait_last,
            settle_timeout_s=CLIENT_BOUND_S + 5,
            run_timeout_s=run_timeout_s,
        )
        swept = list(brokers)
        own = await own_task_steps(
            broker_serving_one_client,
            settle=clients.wait_last,
            settle_timeout_s=CLIENT_BOUND_S + 5,
            run_timeout_s=run_timeout_s,
        )
    phases = collections.Counter(phase_reached(b.recent_events()) for b in swept[1:-1])
    print(
        f"{label}: {own} steps uncancelled (own task), {report.total_steps} (whole run); "
        f"{len(report.cut_runs)} cut runs; cut phases {describe_phases(phases)};"
        f" client ends {clients.ends()}"
    )
    # The uncut runs (the warm-up and the last) were served.
    assert clients.records[0].end is ClientEnd.ECHOED
    assert clients.records[-1].end is ClientEnd.ECHOED
    if sweep_depth_from_environment() is SweepDepth.FULL:
        # Every part of the Hello path was cut at least once.
        assert set(phases) >= HELLO_PATH_PHASES, phases


@pytest.mark.parametrize("mode", ["echo", "never-ack"])
async def test_cutting_the_broker_at_any_step_of_a_hello_ends_the_client_cleanly(
    workspace: Workspace, mode: str
) -> None:
    received_log = workspace.root / "received.log"
    workspace.add_service("svc", mode=mode, env={"RPB_TEST_COUNTER": str(received_log)})
    timing = NEVER_ACK_TIMING if mode == "never-ack" else {}
    config = workspace.config(
        hello_rate_limit=HELLO_RATE_LIMIT, drain_timeout_s=DRAIN_TIMEOUT_S, **timing
    )
    with trio.fail_after(TEST_GUARD_S):
        await sweep_hello_path(
            mode, workspace, config, received_log, SAMPLED, run_timeout_s=RUN_BOUND_S
        )


def _recording_echo(received_log: Path) -> Handler:
    """An echo handler that appends every chunk it receives to ``received_log``."""

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            while data := await stream.receive_some():
                with received_log.open("ab") as log:
                    log.write(data)
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return handler


class FakeScenario(enum.Enum):
    """What the in-process fake backend of each run does."""

    #: Ready only after five virtual seconds: the Hello waits for the spawn.
    SLOW_READY = "slow-ready"
    #: Keeps every handed-off connection and never acknowledges it.
    NEVER_ACK = "never-ack"
    #: Refuses every handoff (tells the client, ACKs ``accepted=False``).
    REJECT = "reject"


#: Sampled cut points under MockClock: a run over fakes takes about 90 steps and
#: no real time but the sockets' (a full sweep takes seconds).
SAMPLED_FAKES = SampleSteps(every_up_to=4, stride=9)


@pytest.mark.parametrize("scenario", list(FakeScenario), ids=lambda s: s.value)
async def test_cutting_a_broker_over_fakes_at_any_step_ends_the_client_cleanly(
    workspace: Workspace, autojump_clock: trio.testing.MockClock, scenario: FakeScenario
) -> None:
    received_log = workspace.root / "received.log"
    script = FakeBackendScript(
        ready_delay_s=5.0 if scenario is FakeScenario.SLOW_READY else 0.0,
        handoff=HandoffBehaviour.NEVER_ACK
        if scenario is FakeScenario.NEVER_ACK
        else HandoffBehaviour.REJECT
        if scenario is FakeScenario.REJECT
        else HandoffBehaviour.ADOPT,
        handler=_recording_echo(received_log),
    )
    definition = workspace.services / "svc.toml"
    definition.write_text(FakeService().toml("svc"))
    definition.chmod(0o600)  # definitions must be private to the broker's user
    config = workspace.config(hello_rate_limit=HELLO_RATE_LIMIT, drain_timeout_s=DRAIN_TIMEOUT_S)
    await sweep_hello_path(
        f"fakes/{scenario.value}",
        workspace,
        config,
        received_log,
        SAMPLED_FAKES,
        fake_script=script,
    )


#: The drain bound of the embedding sweep, s: the SDK echo backend keeps a live
#: connection until just before it (then ends it and exits), so an uncut run's
#: shutdown takes about this long.
LIVE_DRAIN_TIMEOUT_S = 0.5
#: Sampled cut points of the embedding sweep (a run takes about 80 steps).
SAMPLED_EMBEDDING = SampleSteps(every_up_to=3, stride=13)


async def test_cutting_serve_broker_at_any_step_returns_within_the_drain_bound(
    workspace: Workspace,
) -> None:
    # ``serve_broker`` under ``nursery.start`` in the embedding scope, cut at every
    # step of start-up, serving, and the shutdown's drain of a backend holding a
    # live connection (the client, outside the cut, keeps it open until the
    # backend ends it). Each run must return within the drain bound plus the
    # terminate grace and the reap bound, and leave nothing.
    received_log = workspace.root / "received.log"
    workspace.add_service("svc", env={"RPB_TEST_COUNTER": str(received_log)})
    config = workspace.config(
        hello_rate_limit=HELLO_RATE_LIMIT, drain_timeout_s=LIVE_DRAIN_TIMEOUT_S
    )
    socket_file = Path(workspace.socket)
    bound_s = LIVE_DRAIN_TIMEOUT_S + DEFAULT_TERMINATE_GRACE_S + REAP_TIMEOUT_S
    cut_while_draining = 0
    draining = False

    async with trio.open_nursery() as outside:
        clients = OutsideClients(outside, received_log)

        async def embedded() -> None:
            nonlocal draining, cut_while_draining
            draining = False
            try:
                async with trio.open_nursery() as nursery:
                    broker = await nursery.start(functools.partial(rpbroker.serve_broker, config))
                    record = clients.start(
                        functools.partial(open_client, broker.socket_path), hold_open=True
                    )
                    async with trio.open_nursery() as race:
                        race.start_soon(_set_then_cancel, record.echoed, race.cancel_scope)
                        race.start_soon(_set_then_cancel, record.done, race.cancel_scope)
                    broker.request_shutdown()
                    draining = True
            except BaseException:
                if draining:
                    cut_while_draining += 1
                raise

        def socket_removed() -> None:
            assert not socket_file.exists(), f"{socket_file} was left behind"

        with trio.fail_after(TEST_GUARD_S):
            report = await assert_sweep_clean(
                embedded,
                counted=CountedTasks.WHOLE_RUN,
                steps=steps_from_environment(SAMPLED_EMBEDDING),
                invariants=[clients.all_ended, clients.no_request_delivered_twice, socket_removed],
                settle=clients.wait_last,
                settle_timeout_s=CLIENT_BOUND_S + 5,
                # Start-up (a backend process) takes well under the slack.
                run_timeout_s=bound_s + EMBEDDING_START_SLACK_S,
            )
            own = await own_task_steps(
                embedded,
                settle=clients.wait_last,
                settle_timeout_s=CLIENT_BOUND_S + 5,
                run_timeout_s=bound_s + EMBEDDING_START_SLACK_S,
            )
    print(
        f"serve_broker: {own} steps uncancelled (own task), {report.total_steps} (whole run); "
        f"{len(report.cut_runs)} cut runs, {cut_while_draining} during the drain;"
        f" client ends {clients.ends()}"
    )
    assert clients.records[0].end is ClientEnd.ECHOED
    if sweep_depth_from_environment() is SweepDepth.FULL:
        assert cut_while_draining > 0


#: Time a run may take beyond the drain bound, s: start-up, a backend spawn and
#: one echo on a loaded two-core machine.
EMBEDDING_START_SLACK_S = 10.0


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    """Wait for ``event``, then end the race. Cancellation: just stops waiting."""
    await event.wait()
    scope.cancel()
