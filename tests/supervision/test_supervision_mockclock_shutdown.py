"""Graceful shutdown (SPEC §7): stop accepting, quiesce, drain within the bound, then force."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
from rpbroker.backend import DRAIN_EXIT_MARGIN_S
from rpbroker.events import EventKind
from rpbroker.testing import FakeBackendScript, FakeService, open_test_broker

from .conftest import LIMIT_S, exactly

V1 = "1.0.0"
COOPERATIVE = FakeService(idle_timeout_secs=3600)
#: Ignores quiesce, but SIGTERM ends it.
STUBBORN = FakeService(script=FakeBackendScript(exit_on_quiesce=False), idle_timeout_secs=3600)
#: Ignores quiesce and SIGTERM: only SIGKILL ends it.
DEAF = FakeService(
    script=FakeBackendScript(exit_on_quiesce=False, exit_on_terminate=False),
    idle_timeout_secs=3600,
)
#: The terminate grace between SIGTERM and SIGKILL (rpbroker.policy.lifecycle).
GRACE_S = 1.0


async def test_backends_ignoring_quiesce_get_sigterm_then_sigkill_after_the_grace(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {"stubborn": STUBBORN, "deaf": DEAF, "polite": COOPERATIVE}
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            stubborn = await tb.start_backend("stubborn", V1)
            deaf = await tb.start_backend("deaf", V1)
            polite = await tb.start_backend("polite", V1)
            t0 = trio.current_time()
            await tb.broker.shutdown(drain_timeout_s=4)
            # Gone by the drain timeout plus the grace, not a moment later.
            assert trio.current_time() == exactly(t0 + 4 + GRACE_S)

            assert polite.process.returncode == 0
            assert polite.process.exited_at == exactly(t0)
            assert polite.process.signals == []
            assert stubborn.process.returncode == -15
            assert stubborn.process.exited_at == exactly(t0 + 4)
            assert stubborn.process.signals == ["SIGTERM"]
            assert deaf.process.returncode == -9
            assert deaf.process.exited_at == exactly(t0 + 4 + GRACE_S)
            assert deaf.process.signals == ["SIGTERM", "SIGKILL"]
            for fake in (stubborn, deaf, polite):
                assert fake.received_operations == [
                    rpbroker.Quiesce(rpbroker.QuiesceReason.BROKER_SHUTDOWN)
                ]
            stopping = tb.events_of(EventKind.BROKER_STOPPING)
            assert stopping[0].details["drain_timeout_ms"] == 4000
            stopped = {e.pid: e for e in tb.events_of(EventKind.STOPPED)}
            assert stopped[stubborn.pid].at == exactly(t0 + 4)
            assert stopped[deaf.pid].at == exactly(t0 + 4 + GRACE_S)
            assert stopped[polite.pid].at == exactly(t0)
            assert tb.events_of(EventKind.CRASHED) == []
            assert not tb.broker.accepting


async def test_broadcast_ack_wait_runs_inside_the_drain_bound(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # A backend that never answers the quiesce: the 5 s ACK timeout must not be
    # spent before the 3 s drain starts (the shutdown is over at 3 s + grace).
    hung = FakeService(
        script=FakeBackendScript(broadcast=rpbroker.testing.TIMEOUT), idle_timeout_secs=3600
    )
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"hung": hung}) as tb:
            fake = await tb.start_backend("hung", V1)
            t0 = trio.current_time()
            await tb.broker.shutdown(drain_timeout_s=3)
            assert trio.current_time() == exactly(t0 + 3)
            assert fake.process.signals == ["SIGTERM"]
            result = tb.events_of(EventKind.BROADCAST_RESULT)[-1]
            assert result.at <= t0 + 3
            assert len(result.details["timeouts"]) == 1


async def test_configured_drain_timeout_applies_when_leaving_the_block(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"stubborn": STUBBORN}, drain_timeout_s=7) as tb:
            stubborn = await tb.start_backend("stubborn", V1)
            t0 = trio.current_time()
        assert trio.current_time() == exactly(t0 + 7)
        assert stubborn.process.returncode == -15
        assert stubborn.process.exited_at == exactly(t0 + 7)


async def test_cooperative_backends_let_shutdown_finish_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    names = [f"svc-{i}" for i in range(5)]
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, dict.fromkeys(names, COOPERATIVE)) as tb:
            fakes = [await tb.start_backend(name, V1) for name in names]
            t0 = trio.current_time()
            await tb.broker.shutdown()
            assert trio.current_time() == exactly(t0)
            assert all(f.process.returncode == 0 for f in fakes)
            result = tb.events_of(EventKind.BROADCAST_RESULT)[-1]
            assert result.details["sent_count"] == 5
            assert result.details["all_live_backends_acked"] is True


async def test_open_connections_are_drained_within_the_bound(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # A cooperative backend with a live connection waits for it until just before
    # the drain deadline carried by the quiesce command (the SDK's exit margin),
    # then ends the connection and exits by itself: it is never signalled.
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"svc": COOPERATIVE}) as tb:
            fake = await tb.start_backend("svc", V1)
            stream = await tb.connect("svc", V1)
            async with stream:
                t0 = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tb.broker.shutdown, 6)
                    await trio.sleep(2.5)
                    assert fake.alive
                    await stream.send_all(b"still served")
                    assert await stream.receive_some(12) == b"still served"
            assert fake.process.exited_at == exactly(t0 + 6 - DRAIN_EXIT_MARGIN_S)
            assert fake.process.returncode == 0
            assert fake.process.signals == []


async def test_hello_waiting_for_a_spawn_is_refused_with_shutting_down_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    never = FakeService(script=FakeBackendScript(ready_delay_s=math.inf))
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"slow": never}) as tb:
            refused: list[tuple[float, rpbroker.RefusedError]] = []

            async def client() -> None:
                with pytest.raises(rpbroker.RefusedError) as caught:
                    await tb.hello("slow", V1)
                refused.append((trio.current_time(), caught.value))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                await trio.sleep(1)
                t0 = trio.current_time()
                nursery.start_soon(tb.broker.shutdown, 3)
            ((refused_at, error),) = refused
            assert error.code is rpbroker.RefusalCode.SHUTTING_DOWN
            assert refused_at == exactly(t0)
            assert all(f.process.returncode is not None for f in tb.launcher.history)


async def test_partial_spawn_is_cancelled_at_once_on_shutdown(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    never = FakeService(script=FakeBackendScript(ready_delay_s=math.inf))
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"slow": never}) as tb:

            async def start() -> None:
                with pytest.raises(rpbroker.RefusedError):
                    await tb.start_backend("slow", V1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start)
                fake = await tb.launcher.wait_backend("slow", ready=False)
                t0 = trio.current_time()
                await tb.broker.shutdown(drain_timeout_s=3)
            assert fake.process.exited_at == exactly(t0)


async def test_hello_after_shutdown_began_gets_no_backend(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"svc": COOPERATIVE}) as tb:
            await tb.broker.shutdown()
            with pytest.raises(rpbroker.BrokerUnavailableError):
                await tb.hello("svc", V1)
            assert tb.launcher.history == []


async def test_every_fake_process_has_ended_when_the_block_exits(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {
        "polite": COOPERATIVE,
        "stubborn": STUBBORN,
        "hung": FakeService(
            script=FakeBackendScript(broadcast=rpbroker.testing.TIMEOUT), idle_timeout_secs=3600
        ),
    }
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            for name in services:
                await tb.start_backend(name, V1)
            launcher = tb.launcher
        assert len(launcher.history) == 3
        assert all(f.process.returncode is not None for f in launcher.history)
        assert launcher.backends == []
        assert tb.events[-1].kind is EventKind.BROKER_STOPPED


async def test_cancelling_the_surrounding_scope_shuts_down_the_same_way(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        with trio.move_on_after(5) as scope:
            async with open_test_broker(tmp_path, {"stubborn": STUBBORN}, drain_timeout_s=2) as tb:
                stubborn = await tb.start_backend("stubborn", V1)
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert stubborn.process.returncode == -15
        assert stubborn.process.exited_at == exactly(5 + 2)
        # The kit's own event recorder was cancelled with the scope; the broker's
        # log is the record.
        assert tb.broker.recent_events()[-1].kind is EventKind.BROKER_STOPPED
