"""The broker's guarantees at the seams, with real processes (issue: one state machine per backend).

Each test reproduces a failure found from outside: clients racing a SIGKILLed
backend, one connection raising, a cancelled embedding scope at every early
step, a drain with live connections, and a failing backend's handoff budget.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

import rpbroker
from rpbroker.events import EventKind
from rpbroker.services import ServiceCatalog, ServiceSpec
from rpbroker.testing import CountedTasks, SampleSteps, assert_sweep_clean

from .support import Workspace, child_pids, pending_handoffs, round_trip
from .test_e2e_supervision_helpers import watch_events

#: Rounds of "kill the backend, then 20 clients at once".
KILL_ROUNDS = 4
CLIENTS_PER_ROUND = 20
#: Every crash opens a fresh recovery window (so each is retried, never refused)
#: and spawns are not budgeted away: the test is about routing, not about policy.
RACE_CONFIG = {
    "recovery_window_s": 0.001,
    "spawn_attempts_per_window": 1000,
    "spawn_attempts_per_service_window": 1000,
    "hello_rate_limit": 100_000,
}


async def _echoed_once(
    broker: rpbroker.Broker, payload: bytes, routes: list[rpbroker.Route]
) -> None:
    """One client: connect with ``payload`` behind the Hello and get it echoed."""
    async with rpbroker.connect(
        "echo", "1.0.0", broker=broker.socket_path, hello_skip=False, initial_data=payload
    ) as stream:
        assert await round_trip(stream, b"") == b""
        assert await stream.receive_some(len(payload)) == payload
        routes.append(stream.route)


async def test_clients_racing_a_killed_backend_all_get_a_working_route(
    workspace: Workspace,
) -> None:
    # Right after a SIGKILL, 20 concurrent clients: none may get the handoff-ready
    # EVENT without its Negotiated (a BrokerProtocolError), and none may be left
    # with the dead backend's endpoint: each ends with a working stream.
    workspace.add_service("echo")
    async with rpbroker.open_broker(workspace.config(**RACE_CONFIG)) as broker:
        with trio.fail_after(60):
            for round_number in range(KILL_ROUNDS):
                async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path):
                    pass
                [victim] = [i for i in broker.backends if i.routable]
                routes: list[rpbroker.Route] = []
                os.kill(victim.pid, signal.SIGKILL)
                # Wait (without reaping it, and without letting the broker run) until
                # it is dead: its listener and control link are closed in the kernel,
                # but the broker has not seen it yet. That is the race under test; a
                # client that reached the backend before it died would just see a
                # backend crash mid-connection, which is not what is tested here.
                # Blocking on purpose: the broker must not run meanwhile.
                os.waitid(os.P_PID, victim.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
                async with trio.open_nursery() as nursery:
                    for number in range(CLIENTS_PER_ROUND):
                        payload = b"round %d client %d" % (round_number, number)
                        nursery.start_soon(_echoed_once, broker, payload, routes)
                assert len(routes) == CLIENTS_PER_ROUND
                await victim.ended.wait()
                assert victim.status == "crashed"
            # Every attempt has ended (the ACKs come off the clients' critical path).
            await broker.wait_connections_closed()
            assert pending_handoffs(broker).acks == 0


async def test_one_connection_raising_affects_only_itself(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever one connection raises (here: the service lookup itself fails with
    # an unexpected error) is logged, counted and closes that connection alone.
    workspace.add_service("echo")
    workspace.add_service("boom")
    real_load = ServiceCatalog.load

    def load(self: ServiceCatalog, name: str) -> ServiceSpec:
        if name == "boom":
            raise RuntimeError("an unexpected failure in the broker")
        return real_load(self, name)

    monkeypatch.setattr(ServiceCatalog, "load", load)
    async with rpbroker.open_broker(workspace.config()) as broker:
        with trio.fail_after(30):
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as before:
                for _ in range(3):
                    try:
                        async with rpbroker.connect("boom", "1.0.0", broker=broker.socket_path):
                            raise AssertionError("the failing connection must not be served")
                    except rpbroker.BrokerUnavailableError:
                        pass
                # The connection opened before still works, and new ones are served.
                assert await round_trip(before, b"still here") == b"still here"
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as after:
                assert await round_trip(after, b"and after") == b"and after"
            assert broker.accepting
            failed = [e for e in broker.recent_events() if e.kind is EventKind.CONNECTION_FAILED]
            assert len(failed) == 3
            assert "an unexpected failure in the broker" in failed[0].reason
            assert broker.metrics.connection_errors == 3


async def test_cancelling_an_embedded_broker_at_any_step_returns_and_leaves_nothing(
    workspace: Workspace,
) -> None:
    # The embedding scope cut at every step of start-up, serving one client and
    # shutdown (every task of the run counts), sampled: each run must return
    # within its bound, leave no descriptor, task or child, and remove its socket.
    workspace.add_service("echo")
    config = workspace.config(drain_timeout_s=2)
    socket_file = Path(workspace.socket)

    async def embedded() -> None:
        async with (
            rpbroker.open_broker(config) as broker,
            rpbroker.connect("echo", "1.0.0", broker=broker.socket_path, hello_skip=False) as s,
        ):
            assert await round_trip(s, b"ping") == b"ping"

    def socket_removed() -> None:
        assert not socket_file.exists(), f"{socket_file} was left behind"

    def no_backend_left() -> None:
        assert child_pids() == set(), f"backend processes left: {child_pids()}"

    with trio.fail_after(240):
        await assert_sweep_clean(
            embedded,
            counted=CountedTasks.WHOLE_RUN,
            steps=SampleSteps(every_up_to=40, stride=7),
            invariants=[socket_removed, no_backend_left],
            run_timeout_s=30,
        )


async def test_a_draining_backend_ends_its_own_connections_before_the_broker_signals(
    workspace: Workspace,
) -> None:
    # With a live client connection, a graceful stop drains: the backend ends the
    # connection itself just before the drain deadline and exits cleanly (status
    # 0); it is neither SIGTERMed nor SIGKILLed.
    workspace.add_service("echo")
    async with rpbroker.open_broker(workspace.config(drain_timeout_s=1.5)) as broker:
        with trio.fail_after(30):
            stream = await rpbroker.open_connection("echo", "1.0.0", broker=broker.socket_path)
            [backend] = list(broker.backends)
            async with watch_events(broker) as watch, stream:
                assert await round_trip(stream, b"live") == b"live"
                await broker.shutdown()
                stopped = await watch.wait_for(EventKind.STOPPED)
                # The client saw its connection end (the backend closed it).
                assert await stream.receive_some(1) == b""
            assert stopped.pid == backend.pid
            assert stopped.details["status"] == 0
            assert not watch.of(EventKind.STOPPING)
