"""Idle quiesce (SPEC §7): a backend idle for its timeout is quiesced and leaves the registry."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

import rpbroker
from rpbroker.events import EventKind
from rpbroker.testing import FakeBackendScript, FakeService, open_test_broker

from .conftest import LIMIT_S, exactly

SVC = "svc"
V1 = "1.0.0"


async def test_idle_backend_is_quiesced_at_exactly_its_timeout_and_leaves_the_registry(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: FakeService(idle_timeout_secs=10)}) as tb:
            await trio.sleep(2.5)  # the sweep loop is mid-way through its 1 s poll
            since = tb.mark()
            fake = await tb.start_backend(SVC, V1)
            running_at = trio.current_time()

            idle = await tb.wait_event(EventKind.IDLE_QUIESCE, since=since)
            draining = await tb.wait_event(EventKind.DRAINING)
            stopped = await tb.wait_event(EventKind.STOPPED)
            assert idle.at == exactly(running_at + 10)
            assert idle.pid == fake.pid
            assert idle.details["idle_for_ms"] == 10_000
            assert draining.reason == "idle_timeout"
            assert stopped.at == exactly(running_at + 10)
            assert fake.received_operations == [
                rpbroker.Quiesce(rpbroker.QuiesceReason.IDLE_TIMEOUT)
            ]
            assert fake.process.returncode == 0
            assert fake.process.exited_at == exactly(running_at + 10)
            assert tb.handle(SVC, V1) is None
            assert list(tb.broker.backends) == []
            assert tb.events_of(EventKind.CRASHED) == []


async def test_default_idle_timeout_is_thirty_seconds(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: FakeService()}) as tb:
            await tb.start_backend(SVC, V1)
            running_at = trio.current_time()
            idle = await tb.wait_event(EventKind.IDLE_QUIESCE)
            assert idle.at == exactly(running_at + 30)


async def test_each_hello_pushes_the_idle_deadline_back(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: FakeService(idle_timeout_secs=10)}) as tb:
            fake = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            await trio.sleep(6)
            await tb.hello(SVC, V1)  # routed at t0 + 6
            await trio.sleep(8)
            await tb.hello(SVC, V1)  # routed at t0 + 14
            idle = await tb.wait_event(EventKind.IDLE_QUIESCE)
            assert idle.at == exactly(t0 + 24)
            assert idle.pid == fake.pid
            assert len(tb.launcher.launches(SVC)) == 1


async def test_backend_with_an_open_connection_is_not_quiesced(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: FakeService(idle_timeout_secs=10)}) as tb:
            fake = await tb.start_backend(SVC, V1)
            stream = await tb.connect(SVC, V1, handoff=False)
            async with stream:
                assert stream.route is rpbroker.Route.RECONNECT
                await trio.sleep(45)  # several idle timeouts with the connection open
                assert tb.events_of(EventKind.IDLE_QUIESCE) == []
                handle = tb.handle(SVC, V1)
                assert handle is not None and handle.open_connections == 1
                closed_at = trio.current_time()
            # Closing is activity too: the idle clock restarts from the close.
            idle = await tb.wait_event(EventKind.IDLE_QUIESCE)
            assert idle.at == exactly(closed_at + 10)
            assert fake.connections_served == 1
            assert await fake.wait_exited() == 0


async def test_backends_are_quiesced_independently(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {
        "short": FakeService(idle_timeout_secs=5),
        "long": FakeService(idle_timeout_secs=20),
    }
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            short = await tb.start_backend("short", V1)
            long = await tb.start_backend("long", V1)
            t0 = trio.current_time()
            first = await tb.wait_event(EventKind.IDLE_QUIESCE)
            second = await tb.wait_event(EventKind.IDLE_QUIESCE)
            assert (first.pid, first.at) == (short.pid, exactly(t0 + 5))
            assert (second.pid, second.at) == (long.pid, exactly(t0 + 20))


async def test_backend_falling_due_earlier_than_the_current_sleep_is_quiesced_on_time(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {
        "long": FakeService(idle_timeout_secs=100),
        "short": FakeService(idle_timeout_secs=5),
    }
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            await tb.start_backend("long", V1)
            await trio.sleep(2)  # the sweep now sleeps until the long one's due time
            short = await tb.start_backend("short", V1)
            t0 = trio.current_time()
            idle = await tb.wait_event(EventKind.IDLE_QUIESCE)
            assert idle.pid == short.pid
            assert idle.at == exactly(t0 + 5)


async def test_idle_quiesce_can_be_disabled(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(
            tmp_path, {SVC: FakeService(idle_timeout_secs=1)}, idle_check_enabled=False
        ) as tb:
            fake = await tb.start_backend(SVC, V1)
            await trio.sleep(300)
            assert tb.events_of(EventKind.IDLE_QUIESCE) == []
            assert fake.alive


async def test_backend_ignoring_the_idle_quiesce_is_terminated_after_the_drain_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    stubborn = FakeService(script=FakeBackendScript(exit_on_quiesce=False), idle_timeout_secs=10)
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: stubborn}, drain_timeout_s=3) as tb:
            fake = await tb.start_backend(SVC, V1)
            running_at = trio.current_time()
            stopped = await tb.wait_event(EventKind.STOPPED)
            assert stopped.at == exactly(running_at + 10 + 3)
            assert fake.process.returncode == -15
            assert fake.process.signals == ["SIGTERM"]
            assert tb.events_of(EventKind.CRASHED) == []
