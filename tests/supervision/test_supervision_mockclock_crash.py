"""Crash recovery, live (SPEC §7): one retry after 250 ms, then honest refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
from rpbroker.events import EventKind
from rpbroker.testing import FakeService, open_test_broker

from .conftest import LIMIT_S, exactly

SVC = "svc"
V1 = "1.0.0"
#: Long enough that no idle quiesce interferes with a 30 s recovery window.
SERVICES = {SVC: FakeService(idle_timeout_secs=3600)}


async def _sleep_until(deadline: float) -> None:
    await trio.sleep_until(deadline)
    assert trio.current_time() == exactly(deadline)


async def test_crash_is_retried_once_after_exactly_the_backoff_with_no_client(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            first = await tb.start_backend(SVC, V1)
            await trio.sleep(3)
            since = tb.mark()
            crashed_at = trio.current_time()
            first.crash(status=7)

            crashed = await tb.wait_event(EventKind.CRASHED, since=since)
            retrying = await tb.wait_event(EventKind.RETRYING)
            spawning = await tb.wait_event(EventKind.SPAWNING)
            running = await tb.wait_event(EventKind.RUNNING)

            assert crashed.pid == first.pid
            assert crashed.details["status"] == 7
            assert crashed.at == exactly(crashed_at)
            assert retrying.at == exactly(crashed_at)
            assert retrying.details["delay_ms"] == 250
            assert spawning.at == exactly(crashed_at + 0.25)
            assert running.at == exactly(crashed_at + 0.25)

            second = tb.launcher.backend(SVC)
            assert second is not first
            assert running.pid == second.pid
            assert second.ready_at == exactly(crashed_at + 0.25)
            assert len(tb.launcher.launches(SVC)) == 2
            handle = tb.handle(SVC, V1)
            assert handle is not None and handle.pid == second.pid

            # The respawned backend serves clients.
            async with await tb.connect(SVC, V1, initial_data=b"ping") as stream:
                assert await stream.receive_some(4) == b"ping"
            assert tb.events_of(EventKind.UNAVAILABLE) == []


async def test_configured_backoff_is_honoured(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES, recovery_backoff_s=1.5) as tb:
            fake = await tb.start_backend(SVC, V1)
            crashed_at = trio.current_time()
            fake.crash()
            retrying = await tb.wait_event(EventKind.RETRYING)
            running = await tb.wait_event(EventKind.RUNNING, lambda e: e.pid != fake.pid)
            assert retrying.details["delay_ms"] == 1500
            assert running.at == exactly(crashed_at + 1.5)


async def test_second_crash_in_window_marks_unavailable_for_the_rest_of_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            first = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            first.crash()
            second = await tb.launcher.wait_backend(SVC)
            assert second is not first
            await _sleep_until(t0 + 5)
            since = tb.mark()
            second.crash()

            crashed = await tb.wait_event(EventKind.CRASHED, since=since)
            unavailable = await tb.wait_event(EventKind.UNAVAILABLE)
            assert crashed.pid == second.pid
            assert unavailable.at == exactly(t0 + 5)
            assert unavailable.details["retry_after_ms"] == 25_000
            assert "twice" in unavailable.reason
            # No retry this time: nothing is launched for the rest of the window.
            await _sleep_until(t0 + 29.9)
            assert tb.events_of(EventKind.RETRYING, since=since) == []
            assert len(tb.launcher.launches(SVC)) == 2
            assert tb.launcher.live(SVC) == []
            assert tb.handle(SVC, V1) is None


async def test_hello_in_unavailable_window_is_refused_with_the_rest_of_the_window(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            first = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            first.crash()
            second = await tb.launcher.wait_backend(SVC)
            await _sleep_until(t0 + 5)
            second.crash()
            await tb.wait_event(EventKind.UNAVAILABLE)

            await _sleep_until(t0 + 10)
            with pytest.raises(rpbroker.RefusedError) as refused:
                await tb.hello(SVC, V1)
            assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED
            assert refused.value.retry_after_ms == 20_000
            assert "unavailable" in refused.value.reason

            # The real client sees the same typed refusal, with the hint shrinking.
            await _sleep_until(t0 + 29.5)
            with pytest.raises(rpbroker.RefusedError) as refused:
                async with await tb.connect(SVC, V1):
                    pass
            assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED
            assert refused.value.retry_after_ms == 500
            assert len(tb.launcher.launches(SVC)) == 2


async def test_after_the_window_a_hello_spawns_again_and_is_served(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            first = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            first.crash()
            (await tb.launcher.wait_backend(SVC)).crash()
            await tb.wait_event(EventKind.UNAVAILABLE)

            await _sleep_until(t0 + 30)
            since = tb.mark()
            async with await tb.connect(SVC, V1, initial_data=b"back") as stream:
                assert await stream.receive_some(4) == b"back"
                assert trio.current_time() == exactly(t0 + 30)
            running = await tb.wait_event(EventKind.RUNNING, since=since)
            assert running.at == exactly(t0 + 30)
            assert len(tb.launcher.launches(SVC)) == 3
            assert tb.launcher.backend(SVC).pid == running.pid


async def test_crash_at_the_window_boundary_is_retried_again(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # crash -> retry -> the backend stays up for the whole window -> crash -> retry.
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            first = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            first.crash()
            second = await tb.launcher.wait_backend(SVC)
            await _sleep_until(t0 + 30.25)
            since = tb.mark()
            second.crash()
            retrying = await tb.wait_event(EventKind.RETRYING, since=since)
            running = await tb.wait_event(EventKind.RUNNING)
            assert retrying.at == exactly(t0 + 30.25)
            assert running.at == exactly(t0 + 30.5)
            assert tb.events_of(EventKind.UNAVAILABLE) == []
            assert len(tb.launcher.live(SVC)) == 1
            assert len(tb.launcher.launches(SVC)) == 3


async def test_second_crash_just_inside_the_window_is_unavailable(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            first = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            first.crash()
            second = await tb.launcher.wait_backend(SVC)
            await _sleep_until(t0 + 29.9)
            second.crash()
            unavailable = await tb.wait_event(EventKind.UNAVAILABLE)
            assert unavailable.details["retry_after_ms"] == 100
            # At the end of the window service resumes by itself on the next Hello.
            await _sleep_until(t0 + 30)
            negotiated = await tb.hello(SVC, V1)
            assert negotiated.backend_pipe == tb.launcher.backend(SVC).endpoint


async def test_expected_exits_are_not_crashes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            fake = await tb.start_backend(SVC, V1)
            result = await tb.broker.broadcast(rpbroker.Quiesce(rpbroker.QuiesceReason.MAINTENANCE))
            assert len(result.acks) == 1
            stopped = await tb.wait_event(EventKind.STOPPED)
            assert stopped.pid == fake.pid
            assert await fake.wait_exited() == 0
            await trio.sleep(1)
            assert tb.events_of(EventKind.CRASHED) == []
            assert tb.events_of(EventKind.RETRYING) == []
            assert tb.handle(SVC, V1) is None
            assert len(tb.launcher.launches(SVC)) == 1


async def test_crashes_of_different_versions_are_counted_separately(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, SERVICES) as tb:
            a = await tb.start_backend(SVC, "1.0.0")
            b = await tb.start_backend(SVC, "2.0.0")
            since = tb.mark()
            a.crash()
            await tb.wait_event(EventKind.RUNNING, lambda e: e.pid != a.pid, since=since)
            since = tb.mark()
            b.crash()
            await tb.wait_event(EventKind.RUNNING, lambda e: e.pid != b.pid, since=since)
            assert tb.events_of(EventKind.UNAVAILABLE) == []
            assert {f.service_version for f in tb.launcher.live(SVC)} == {"1.0.0", "2.0.0"}
