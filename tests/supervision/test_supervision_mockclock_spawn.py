"""Spawning (SPEC §4.6): budget of 3 per 30 s per key, single flight, bounded readiness."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
from rpbroker.events import EventKind
from rpbroker.testing import FakeBackendScript, FakeService, open_test_broker
from rpbroker.wire import Negotiated

from .conftest import LIMIT_S, exactly

SVC = "svc"
V1 = "1.0.0"
CRASHING = FakeService(
    script=FakeBackendScript(exit_before_ready=True, exit_status=3), idle_timeout_secs=3600
)
NEVER_READY = FakeService(script=FakeBackendScript(ready_delay_s=math.inf), idle_timeout_secs=3600)


async def test_three_failed_spawns_then_rate_limited_for_the_rest_of_the_window(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: CRASHING}) as tb:
            t0 = trio.current_time()
            for attempt_at in (t0, t0 + 4, t0 + 9):
                await trio.sleep_until(attempt_at)
                with pytest.raises(rpbroker.RefusedError) as refused:
                    await tb.hello(SVC, V1)
                assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED
                assert "exited with status 3 before becoming ready" in refused.value.reason
                assert refused.value.retry_after_ms == 1000
                assert trio.current_time() == exactly(attempt_at)

            await trio.sleep_until(t0 + 12)
            with pytest.raises(rpbroker.RefusedError) as refused:
                await tb.hello(SVC, V1)
            assert refused.value.code is rpbroker.RefusalCode.RATE_LIMITED
            assert refused.value.retry_after_ms == 18_000
            assert "budget" in refused.value.reason
            assert len(tb.launcher.launches(SVC)) == 3
            failed = tb.events_of(EventKind.SPAWN_FAILED)
            assert [f.at for f in failed] == [exactly(t0), exactly(t0 + 4), exactly(t0 + 9)]
            # A spawn failure is not a crash: no retry, no unavailable window.
            assert tb.events_of(EventKind.CRASHED) == []
            assert tb.events_of(EventKind.RETRYING) == []

            # The window runs from the first attempt: at t0 + 30 spawning works again.
            tb.set_script(SVC, FakeBackendScript())
            await trio.sleep_until(t0 + 29.999)
            with pytest.raises(rpbroker.RefusedError) as refused:
                await tb.hello(SVC, V1)
            assert refused.value.code is rpbroker.RefusalCode.RATE_LIMITED
            assert refused.value.retry_after_ms == 1
            await trio.sleep_until(t0 + 30)
            async with await tb.connect(SVC, V1, initial_data=b"ok") as stream:
                assert await stream.receive_some(2) == b"ok"
            assert len(tb.launcher.launches(SVC)) == 4


async def test_launch_errors_count_against_the_budget(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    broken = FakeService(script=FakeBackendScript(spawn_error="no such executable"))
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: broken}) as tb:
            for _ in range(3):
                with pytest.raises(rpbroker.RefusedError) as refused:
                    await tb.hello(SVC, V1)
                assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED
                assert "no such executable" in refused.value.reason
            with pytest.raises(rpbroker.RefusedError) as refused:
                await tb.hello(SVC, V1)
            assert refused.value.code is rpbroker.RefusalCode.RATE_LIMITED
            assert refused.value.retry_after_ms == 30_000
            assert tb.launcher.history == []


async def test_budget_is_per_version(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: CRASHING}) as tb:
            for _ in range(3):
                with pytest.raises(rpbroker.RefusedError):
                    await tb.hello(SVC, "1.0.0")
            tb.set_script(SVC, FakeBackendScript())
            negotiated = await tb.hello(SVC, "2.0.0")
            assert negotiated.backend_pipe == tb.launcher.backend(SVC, "2.0.0").endpoint


async def test_a_success_resets_the_budget(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: CRASHING}) as tb:
            for _ in range(2):
                with pytest.raises(rpbroker.RefusedError):
                    await tb.hello(SVC, V1)
            tb.set_script(SVC, FakeBackendScript(exit_on_quiesce=True))
            fake = await tb.start_backend(SVC, V1)
            await tb.broker.broadcast(rpbroker.Quiesce(rpbroker.QuiesceReason.MAINTENANCE))
            await fake.wait_exited()
            await tb.wait_event(EventKind.STOPPED)
            tb.set_script(SVC, CRASHING.script)
            # Three fresh attempts are allowed again in the same 30 s.
            for _ in range(3):
                with pytest.raises(rpbroker.RefusedError) as refused:
                    await tb.hello(SVC, V1)
                assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED


async def test_never_ready_backend_fails_at_exactly_the_readiness_ceiling(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(
            tmp_path, {SVC: NEVER_READY}, spawn_ready_timeout_s=5, hello_wait_timeout_s=30
        ) as tb:
            t0 = trio.current_time()
            with pytest.raises(rpbroker.RefusedError) as refused:
                await tb.hello(SVC, V1)
            assert trio.current_time() == exactly(t0 + 5)
            assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED
            assert "not ready within 5 s" in refused.value.reason
            failed = await tb.wait_event(EventKind.SPAWN_FAILED)
            assert failed.at == exactly(t0 + 5)
            fake = tb.launcher.launches(SVC)[0]
            assert fake.process.returncode == -9
            assert fake.process.exited_at == exactly(t0 + 5)
            assert not fake.ready
            assert tb.handle(SVC, V1) is None


async def test_hello_wait_shorter_than_the_ceiling_refuses_first_and_the_spawn_goes_on(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(
            tmp_path, {SVC: NEVER_READY}, spawn_ready_timeout_s=60, hello_wait_timeout_s=2
        ) as tb:
            t0 = trio.current_time()
            with pytest.raises(rpbroker.RefusedError) as refused:
                await tb.hello(SVC, V1)
            assert trio.current_time() == exactly(t0 + 2)
            assert refused.value.code is rpbroker.RefusalCode.BACKEND_SPAWN_FAILED
            assert "before the Hello deadline" in refused.value.reason
            assert refused.value.retry_after_ms == 1000
            # The waiter left; the spawn itself runs to its own ceiling.
            fake = tb.launcher.launches(SVC)[0]
            assert fake.alive
            failed = await tb.wait_event(EventKind.SPAWN_FAILED)
            assert failed.at == exactly(t0 + 60)
            assert fake.process.exited_at == exactly(t0 + 60)


async def test_slow_backend_is_served_as_soon_as_it_is_ready(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow = FakeService(script=FakeBackendScript(ready_delay_s=3), idle_timeout_secs=3600)
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: slow}) as tb:
            t0 = trio.current_time()
            async with await tb.connect(SVC, V1, initial_data=b"hey") as stream:
                assert trio.current_time() == exactly(t0 + 3)
                assert await stream.receive_some(3) == b"hey"
            running = await tb.wait_event(EventKind.RUNNING)
            assert running.at == exactly(t0 + 3)


async def test_concurrent_hellos_share_one_spawn(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow = FakeService(script=FakeBackendScript(ready_delay_s=3), idle_timeout_secs=3600)
    replies: list[tuple[float, Negotiated]] = []
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: slow}) as tb:
            t0 = trio.current_time()

            async def one_client() -> None:
                negotiated = await tb.hello(SVC, V1)
                replies.append((trio.current_time(), negotiated))

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one_client)
            assert len(replies) == 8
            assert len(tb.launcher.launches(SVC)) == 1
            assert {n.backend_pipe for _, n in replies} == {tb.launcher.backend(SVC).endpoint}
            assert all(at == exactly(t0 + 3) for at, _ in replies)
            assert len({n.connection_id for _, n in replies}) == 8


async def test_a_waiter_that_leaves_does_not_cancel_the_shared_spawn(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow = FakeService(script=FakeBackendScript(ready_delay_s=3), idle_timeout_secs=3600)
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {SVC: slow}) as tb:
            t0 = trio.current_time()
            with trio.move_on_after(1):
                await tb.hello(SVC, V1)  # the client gives up (disconnects) at t0 + 1
            negotiated = await tb.hello(SVC, V1)
            assert trio.current_time() == exactly(t0 + 3)
            assert len(tb.launcher.launches(SVC)) == 1
            assert negotiated.backend_pipe == tb.launcher.backend(SVC).endpoint
