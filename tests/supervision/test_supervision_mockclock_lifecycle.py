"""The lifecycle at the seams, on MockClock: broadcasts, abandonments, recovery, events, SDK."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
from rpbroker.events import SUBSCRIBER_BUFFER, EventKind
from rpbroker.testing import FakeBackendScript, FakeService, HandoffBehaviour, open_test_broker

from .conftest import LIMIT_S, exactly

V1 = "1.0.0"
RELEASE = rpbroker.ReleaseHandles("/data")


async def test_a_broadcast_waits_for_a_starting_backend_and_reaches_a_draining_one(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Neither is dead: the starting one gets the operation once ready (inside the
    # ACK timeout), the draining one still holds handles and gets it at once.
    slow = FakeService(script=FakeBackendScript(ready_delay_s=2), idle_timeout_secs=3600)
    stubborn = FakeService(script=FakeBackendScript(exit_on_quiesce=False), idle_timeout_secs=3600)
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"slow": slow, "stubborn": stubborn}) as tb:
            draining = await tb.start_backend("stubborn", V1)
            quiesced = await tb.broker.broadcast(
                rpbroker.Quiesce(rpbroker.QuiesceReason.MAINTENANCE)
            )
            assert len(quiesced.acks) == 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tb.start_backend, "slow", V1)
                starting = await tb.launcher.wait_backend("slow", ready=False)
                t0 = trio.current_time()
                result = await tb.broker.broadcast(RELEASE, ack_timeout_s=5)
            assert trio.current_time() == exactly(t0 + 2)
            assert {o.backend.pid for o in result.acks} == {draining.pid, starting.pid}
            assert result.skipped_dead == ()
            assert draining.received_operations[-1] == RELEASE
            assert starting.received_operations == [RELEASE]


async def test_a_backend_that_never_becomes_ready_times_out_and_is_not_reported_dead(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    never = FakeService(script=FakeBackendScript(ready_delay_s=math.inf))
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"never": never}) as tb, trio.open_nursery() as n:

            async def start() -> None:
                with pytest.raises(rpbroker.RefusedError):
                    await tb.start_backend("never", V1)

            n.start_soon(start)
            await tb.launcher.wait_backend("never", ready=False)
            result = await tb.broker.broadcast(RELEASE, ack_timeout_s=1)
            assert len(result.timeouts) == 1
            assert result.skipped_dead == ()
            n.cancel_scope.cancel()


async def test_a_handoff_abandoned_by_the_shutdown_is_not_a_backend_failure(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    hold = {"svc": FakeService(script=FakeBackendScript(handoff=HandoffBehaviour.NEVER_ACK))}
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, hold) as tb:
            fake = await tb.start_backend("svc", V1)

            async def client() -> None:
                # The backend and the broker both stop: a typed error is all it gets.
                with pytest.raises(rpbroker.BrokerError):
                    await tb.connect("svc", V1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                # Once everything is blocked, the attempt is waiting for its ACK.
                await trio.testing.wait_all_tasks_blocked()
                assert fake.offers_received == 1
                await tb.broker.shutdown(drain_timeout_s=1)
                nursery.cancel_scope.cancel()
            [fallback] = tb.events_of(EventKind.HANDOFF_FALLBACK)
            assert fallback.details["failure"] == "broker-stopping"
            assert fallback.details["fd_reached_backend"] is True
            assert len(tb.broker.handoff.acks) == 0


async def test_recovered_is_emitted_once_a_crashed_backend_stays_healthy_for_a_window(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    svc = {"svc": FakeService(idle_timeout_secs=3600)}
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, svc, recovery_window_s=10) as tb:
            first = await tb.start_backend("svc", V1)
            first.crash()
            running = await tb.wait_event(EventKind.RUNNING, lambda e: e.pid != first.pid)
            recovered = await tb.wait_event(EventKind.RECOVERED)
            assert recovered.at == exactly(running.at + 10)
            assert recovered.pid == running.pid
            # The record is clear: the next crash is retried again, not refused.
            second = tb.launcher.by_pid(running.pid)
            second.crash()
            await tb.wait_event(EventKind.RETRYING)
            assert tb.events_of(EventKind.UNAVAILABLE) == []


async def test_recovered_is_emitted_when_an_unavailable_backend_serves_again(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    svc = {"svc": FakeService(idle_timeout_secs=3600)}
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, svc, recovery_window_s=10) as tb:
            first = await tb.start_backend("svc", V1)
            first.crash()
            await tb.wait_event(EventKind.RUNNING, lambda e: e.pid != first.pid)
            tb.launcher.backend("svc").crash()
            unavailable = await tb.wait_event(EventKind.UNAVAILABLE)
            await trio.sleep_until(unavailable.at + 10)
            await tb.start_backend("svc", V1)
            recovered = await tb.wait_event(EventKind.RECOVERED)
            assert recovered.reason == "serving again after the window"


async def test_iter_events_subscribes_at_the_call_and_reports_what_it_lost(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"svc": FakeService()}) as tb:
            subscription = tb.broker.iter_events()
            # Emitted before the first __anext__: kept.
            tb.broker.events.emit(EventKind.FD_PRESSURE, reason="first")
            assert (await subscription.__anext__()).reason == "first"
            for n in range(SUBSCRIBER_BUFFER + 5):
                tb.broker.events.emit(EventKind.FD_PRESSURE, reason=f"burst {n}")
            lost = await subscription.__anext__()
            assert lost.kind is EventKind.EVENTS_DROPPED
            assert lost.details["dropped"] == 5
            assert subscription.dropped == 5
            assert (await subscription.__anext__()).reason == "burst 5"
            subscription.close()


async def test_leaving_an_event_loop_by_break_unsubscribes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"svc": FakeService()}) as tb:
            log = tb.broker.events
            before = len(log._subscribers)

            async def first_event() -> None:
                async for _event in tb.broker.iter_events():
                    break

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_event)
                await trio.testing.wait_all_tasks_blocked()
                assert len(log._subscribers) == before + 1
                log.emit(EventKind.FD_PRESSURE, reason="one")
            assert len(log._subscribers) == before


async def test_a_slow_release_hook_does_not_hold_up_a_handoff(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async def slow_release(prefix: str) -> None:
        await trio.sleep(60)

    svc = {
        "svc": FakeService(
            script=FakeBackendScript(on_release_handles=slow_release), idle_timeout_secs=3600
        )
    }
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, svc) as tb:
            fake = await tb.start_backend("svc", V1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tb.broker.broadcast, RELEASE)
                await trio.testing.wait_all_tasks_blocked()
                t0 = trio.current_time()
                async with await tb.connect("svc", V1, initial_data=b"now") as stream:
                    assert stream.route is rpbroker.Route.HANDOFF
                    assert await stream.receive_some(3) == b"now"
                assert trio.current_time() == exactly(t0)
                assert fake.handoffs_adopted == 1
            # The hook was bounded by the broadcast's ACK timeout (5 s), not 60 s.
            result = await tb.wait_event(EventKind.BROADCAST_RESULT)
            assert len(result.details["timeouts"]) == 1
            assert result.at == exactly(t0 + 5)
