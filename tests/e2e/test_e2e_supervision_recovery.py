"""Crash recovery and idle quiesce, with real backend processes and real signals.

SPEC §7: a backend that exits unexpectedly is retried once after the back-off with
no client involved; a second crash in the window marks it unavailable and Hellos
get an honest refusal with the rest of the window as retry-after; after the window
it is served again. An idle backend is quiesced through the broadcast path, leaves
the registry and is not counted as a crash.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import trio

import rpbroker
from rpbroker.admin_client import admin_request
from rpbroker.events import EventKind
from rpbroker.supervisor import Incarnation as BackendHandle
from rpbroker.wire.codes import AdminVerb, RefusalCode

from .support import Workspace, child_pids, round_trip
from .test_e2e_supervision_helpers import pid_gone, watch_events

#: The spawn of a Python backend must fit twice in the window for "crashed twice"
#: to happen inside it, also on a loaded machine; the test waits the rest of it out.
SHORT_WINDOW_S = 3.0


def only_backend(broker: rpbroker.Broker, service: str) -> BackendHandle:
    handles = [h for h in broker.backends if h.key.service_name == service]
    assert len(handles) == 1, handles
    return handles[0]


async def served(broker: rpbroker.Broker, service: str, payload: bytes) -> rpbroker.Route:
    async with rpbroker.connect(service, "1.0.0", broker=broker.socket_path) as stream:
        assert await round_trip(stream, payload) == payload
        return stream.route


async def test_killed_backend_is_respawned_with_no_client_involved(workspace: Workspace) -> None:
    workspace.add_service("echo")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(recovery_backoff_s=0.05)) as broker:
            assert await served(broker, "echo", b"before") is rpbroker.Route.HANDOFF
            first = only_backend(broker, "echo")
            async with watch_events(broker) as watch:
                os.kill(first.pid, signal.SIGKILL)
                running = await watch.wait_for(EventKind.RUNNING)
            assert running.pid not in (0, first.pid)
            assert watch.kinds("echo") == [
                EventKind.CRASHED,
                EventKind.RETRYING,
                EventKind.SPAWNING,
                EventKind.RUNNING,
            ]
            crashed = watch.of(EventKind.CRASHED)[0]
            assert crashed.pid == first.pid
            assert crashed.details["status"] == -signal.SIGKILL
            assert crashed.reason == f"exited unexpectedly with status {-signal.SIGKILL}"
            assert watch.of(EventKind.RETRYING)[0].details["delay_ms"] == 50
            assert first.ended.is_set() and pid_gone(first.pid)
            second = only_backend(broker, "echo")
            assert second.pid == running.pid
            assert second.endpoint != first.endpoint
            # The client's cached endpoint is dead: it falls back to a Hello by itself
            # and is served by the respawned backend.
            assert await served(broker, "echo", b"after") is rpbroker.Route.HANDOFF
            assert only_backend(broker, "echo") is second
            assert not watch.of(EventKind.UNAVAILABLE)


async def test_second_crash_in_the_window_refuses_honestly_until_the_window_ends(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    config = workspace.config(recovery_backoff_s=0.05, recovery_window_s=SHORT_WINDOW_S)
    with trio.fail_after(40):
        async with rpbroker.open_broker(config) as broker:
            await served(broker, "echo", b"warm")
            async with watch_events(broker) as watch:
                os.kill(only_backend(broker, "echo").pid, signal.SIGKILL)
                await watch.wait_for(EventKind.RUNNING)
                os.kill(only_backend(broker, "echo").pid, signal.SIGKILL)
                unavailable = await watch.wait_for(EventKind.UNAVAILABLE)
                assert watch.kinds("echo") == [
                    EventKind.CRASHED,
                    EventKind.RETRYING,
                    EventKind.SPAWNING,
                    EventKind.RUNNING,
                    EventKind.CRASHED,
                    EventKind.UNAVAILABLE,
                ]
                assert 0 < unavailable.details["retry_after_ms"] <= SHORT_WINDOW_S * 1000
                assert list(broker.backends) == []

                refusals: list[rpbroker.RefusedError] = []
                while True:
                    try:
                        route = await served(broker, "echo", b"back again")
                    except rpbroker.RefusedError as exc:
                        assert exc.code is RefusalCode.BACKEND_SPAWN_FAILED
                        assert "unavailable" in exc.reason
                        assert exc.retry_after_ms is not None
                        assert 0 < exc.retry_after_ms <= SHORT_WINDOW_S * 1000
                        if refusals:
                            # The hint counts down the same window.
                            assert exc.retry_after_ms <= refusals[-1].retry_after_ms  # type: ignore[operator]
                        refusals.append(exc)
                        # While refusing, nothing is spawned.
                        assert len(watch.of(EventKind.SPAWNING)) == 1
                        await trio.sleep(exc.retry_after_ms / 1000)
                        continue
                    break
            assert refusals, "a Hello inside the window was refused"
            assert route in (rpbroker.Route.HANDOFF, rpbroker.Route.RECONNECT)
            assert len(watch.of(EventKind.SPAWNING)) == 2
            refused = [e for e in watch.of(EventKind.HELLO_REFUSED) if e.service_name == "echo"]
            assert len(refused) == len(refusals)
            assert {e.details["code"] for e in refused} == {"BACKEND_SPAWN_FAILED"}


async def test_crash_looping_service_gets_one_retry_then_refusals(workspace: Workspace) -> None:
    workspace.add_service("looping", mode="crash-after-ready")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(recovery_backoff_s=0.05)) as broker:
            async with watch_events(broker) as watch:
                # The first client meets a backend that dies as soon as it is ready:
                # whatever it gets, it is a typed error, never a hang.
                with pytest.raises((rpbroker.BrokerError, trio.BrokenResourceError)):
                    async with rpbroker.connect(
                        "looping", "1.0.0", broker=broker.socket_path, initial_data=b"x"
                    ) as stream:
                        await stream.send_all(b"y")
                        assert await stream.receive_some(2) == b"xy"
                        raise AssertionError("a crashing backend served a client")
                await watch.wait_for(EventKind.UNAVAILABLE)
                for _ in range(3):
                    with pytest.raises(rpbroker.RefusedError) as info:
                        await rpbroker.open_connection(
                            "looping", "1.0.0", broker=broker.socket_path, hello_skip=False
                        )
                    assert info.value.code is RefusalCode.BACKEND_SPAWN_FAILED
                    assert "unavailable" in info.value.reason
                    assert info.value.retry_after_ms is not None
                    assert 0 < info.value.retry_after_ms <= 30_000
            # Exactly one retry: two spawns in the window, two crashes with the
            # backend's own (non-zero, not a signal) status, then nothing more.
            assert len(watch.of(EventKind.SPAWNING)) == 2
            statuses = [e.details["status"] for e in watch.of(EventKind.CRASHED)]
            assert len(statuses) == 2 and all(s > 0 for s in statuses), statuses
            assert len(watch.of(EventKind.RETRYING)) == 1
            assert len(watch.of(EventKind.UNAVAILABLE)) == 1
            assert list(broker.backends) == []
            assert child_pids() == set()


async def test_idle_backend_is_quiesced_leaves_the_registry_and_is_not_a_crash(
    workspace: Workspace,
) -> None:
    workspace.add_service("sleepy", idle_timeout_secs=0.5)
    with trio.fail_after(40):
        async with (
            rpbroker.open_broker(workspace.config(recovery_backoff_s=0.05)) as broker,
            watch_events(broker) as watch,
        ):
            await served(broker, "sleepy", b"once")
            first = only_backend(broker, "sleepy")
            stopped = await watch.wait_for(EventKind.STOPPED)
            assert stopped.pid == first.pid
            assert watch.kinds("sleepy") == [
                EventKind.SPAWNING,
                EventKind.RUNNING,
                EventKind.IDLE_QUIESCE,
                EventKind.DRAINING,
                EventKind.STOPPED,
            ]
            assert watch.of(EventKind.DRAINING)[0].reason == "idle_timeout"
            assert watch.of(EventKind.IDLE_QUIESCE)[0].details["idle_for_ms"] >= 500
            quiesce = watch.of(EventKind.BROADCAST_RESULT)[0]
            assert quiesce.details["operation"] == {"op": "quiesce", "reason": "idle_timeout"}
            assert len(quiesce.details["acks"]) == 1
            assert stopped.details["status"] == 0, "it drained and exited by itself"
            assert list(broker.backends) == []
            assert pid_gone(first.pid)

            # A new Hello spawns a fresh backend; hold a connection so it is not idle.
            async with rpbroker.connect("sleepy", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"again") == b"again"
                second = only_backend(broker, "sleepy")
                assert second.pid != first.pid
                # The idle stop was not a crash: this first crash gets its retry.
                os.kill(second.pid, signal.SIGKILL)
                await watch.wait_for(EventKind.RUNNING, count=3)
            assert not watch.of(EventKind.UNAVAILABLE)
            assert [e.pid for e in watch.of(EventKind.CRASHED)] == [second.pid]
            assert len(watch.of(EventKind.RETRYING)) == 1


async def test_backend_with_a_live_connection_is_not_idle_quiesced(workspace: Workspace) -> None:
    workspace.add_service("sleepy", idle_timeout_secs=0.5)
    with trio.fail_after(30):
        async with (
            rpbroker.open_broker(workspace.config()) as broker,
            watch_events(broker) as watch,
        ):
            async with rpbroker.connect("sleepy", "1.0.0", broker=broker.socket_path) as held:
                assert await round_trip(held, b"1") == b"1"
                # Three idle timeouts pass while the connection stays open.
                await trio.sleep(1.5)
                assert not watch.of(EventKind.IDLE_QUIESCE)
                assert await round_trip(held, b"2") == b"2"
            pid = only_backend(broker, "sleepy").pid
            # Once the connection is closed the backend goes idle and is quiesced.
            idle = await watch.wait_for(EventKind.IDLE_QUIESCE)
            assert idle.pid == pid
            await watch.wait_for(EventKind.STOPPED)
            assert not watch.of(EventKind.CRASHED)


async def test_a_shorter_idle_timeout_registered_later_is_honoured(workspace: Workspace) -> None:
    workspace.add_service("patient", idle_timeout_secs=300)
    workspace.add_service("hasty", idle_timeout_secs=0.5)
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await served(broker, "patient", b"p")
            # Let the idle loop settle on the only deadline it knows (300 s away).
            await trio.sleep(1.5)
            async with watch_events(broker) as watch:
                await served(broker, "hasty", b"h")
                hasty = only_backend(broker, "hasty")
                # A 0.5 s idle timeout must not wait for the 300 s one.
                with trio.move_on_after(5):
                    await watch.wait_for(EventKind.IDLE_QUIESCE)
                assert [(e.service_name, e.pid) for e in watch.of(EventKind.IDLE_QUIESCE)] == [
                    ("hasty", hasty.pid)
                ], "the hasty backend was not quiesced while the loop slept for the patient one"
            assert not only_backend(broker, "patient").exited.is_set()


async def test_failing_spawns_spend_the_budget_then_hellos_are_rate_limited(
    workspace: Workspace,
) -> None:
    workspace.add_service("broken", mode="exit-before-ready")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config()) as broker:
            async with watch_events(broker) as watch:
                for _ in range(3):
                    with pytest.raises(rpbroker.RefusedError) as info:
                        await rpbroker.open_connection("broken", "1.0.0", broker=broker.socket_path)
                    assert info.value.code is RefusalCode.BACKEND_SPAWN_FAILED
                    assert "exited with status 3 before becoming ready" in info.value.reason
                    assert info.value.retry_after_ms == 1000
                with pytest.raises(rpbroker.RefusedError) as info:
                    await rpbroker.open_connection("broken", "1.0.0", broker=broker.socket_path)
                assert info.value.code is RefusalCode.RATE_LIMITED
                assert info.value.reason == "backend spawn budget exhausted"
                assert info.value.retry_after_ms is not None
                assert 0 < info.value.retry_after_ms <= 30_000
                reply = await admin_request(broker.socket_path, AdminVerb.DUMP)
            # A spawn that never became ready is a failed spawn, not a crash to recover.
            assert len(watch.of(EventKind.SPAWNING)) == 3
            assert len(watch.of(EventKind.SPAWN_FAILED)) == 3
            assert not watch.of(EventKind.CRASHED) and not watch.of(EventKind.RETRYING)
            [budget] = json.loads(reply.body)["spawn_budgets"]
            assert (budget["service_name"], budget["attempts_used"], budget["remaining"]) == (
                "broken",
                3,
                0,
            )
            assert 0 < budget["retry_after_ms"] <= 30_000
            assert list(broker.backends) == []
