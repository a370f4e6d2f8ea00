"""Lifecycle broadcast fan-out (SPEC §7): concurrent, each backend bounded by its own timeout."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

import rpbroker
from rpbroker.events import EventKind
from rpbroker.policy.broadcast import BroadcastFailure
from rpbroker.supervisor import Incarnation as BackendHandle
from rpbroker.testing import (
    ACK,
    DEAD,
    TIMEOUT,
    BroadcastResponse,
    FakeBackend,
    FakeBackendScript,
    FakeService,
    TestBroker,
    fanout_benchmark,
    open_test_broker,
)

from .conftest import LIMIT_S, exactly

RELEASE = rpbroker.ReleaseHandles("/data/volume-1")
MIXED: dict[str, BroadcastResponse] = {
    "ack-a": ACK,
    "ack-b": ACK,
    "ack-c": ACK,
    "ack-d": ACK,
    "slow-a": TIMEOUT,
    "slow-b": TIMEOUT,
    "rejects": BroadcastFailure.REJECTED,
    "unsupported": BroadcastFailure.UNSUPPORTED_OPERATION,
    "dies-a": DEAD,
    "dies-b": DEAD,
}


def _service(response: BroadcastResponse) -> FakeService:
    return FakeService(script=FakeBackendScript(broadcast=response), idle_timeout_secs=3600)


def _pids(outcomes: tuple[object, ...]) -> set[int]:
    pids = set()
    for outcome in outcomes:
        backend = getattr(outcome, "backend", None)
        assert isinstance(backend, BackendHandle)
        pids.add(backend.pid)
    return pids


async def _start_all(tb: TestBroker, names: list[str], version: str = "1.0.0") -> list[FakeBackend]:
    return [await tb.start_backend(name, version) for name in names]


async def test_mixed_backends_are_each_reported_and_the_fan_out_takes_one_ack_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {name: _service(response) for name, response in MIXED.items()}
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            fakes = {f.service_name: f for f in await _start_all(tb, list(MIXED))}
            since = tb.mark()
            started = trio.current_time()
            result = await tb.broker.broadcast(RELEASE)
            elapsed = trio.current_time() - started

            # Concurrent: the slowest backend's timeout, not the sum of timeouts.
            assert elapsed == exactly(5.0)

            def pids(*names: str) -> set[int]:
                return {fakes[name].pid for name in names}

            assert _pids(result.acks) == pids("ack-a", "ack-b", "ack-c", "ack-d")
            assert _pids(result.timeouts) == pids("slow-a", "slow-b")
            assert all(t.timeout_s == 5.0 for t in result.timeouts)
            assert _pids(result.failures) == pids("rejects", "unsupported")
            assert {f.failure for f in result.failures} == {
                BroadcastFailure.REJECTED,
                BroadcastFailure.UNSUPPORTED_OPERATION,
            }
            assert _pids(result.skipped_dead) == pids("dies-a", "dies-b")
            assert result.sent_count == 8
            assert not result.all_live_backends_acked

            # Every live backend received the operation exactly once.
            for fake in fakes.values():
                assert fake.received_operations == [RELEASE]
            # The result is an event too, emitted when the fan-out ended.
            recorded = await tb.wait_event(EventKind.BROADCAST_RESULT, since=since)
            assert recorded.at == exactly(started + 5.0)
            assert recorded.details["sent_count"] == 8
            # A backend dying on a release-handles command is a crash: it is retried.
            assert {e.pid for e in tb.events_of(EventKind.CRASHED, since=since)} == pids(
                "dies-a", "dies-b"
            )


async def test_all_acks_return_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    names = [f"svc-{i}" for i in range(10)]
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {n: _service(ACK) for n in names}) as tb:
            fakes = await _start_all(tb, names)
            started = trio.current_time()
            result = await tb.broker.broadcast(RELEASE)
            assert trio.current_time() == exactly(started)
            assert result.all_live_backends_acked
            assert _pids(result.acks) == {f.pid for f in fakes}


async def test_explicit_ack_timeout_is_honoured(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {"fast": _service(ACK), "hung": _service(TIMEOUT)}
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            fast, hung = await _start_all(tb, ["fast", "hung"])
            started = trio.current_time()
            result = await tb.broker.broadcast(RELEASE, ack_timeout_s=1.25)
            assert trio.current_time() - started == exactly(1.25)
            assert _pids(result.acks) == {fast.pid}
            assert _pids(result.timeouts) == {hung.pid}
            assert result.timeouts[0].timeout_s == 1.25
            assert result.to_json()["timeouts"][0]["timeout_ms"] == 1250


async def test_configured_ack_timeout_is_the_default(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(
            tmp_path, {"hung": _service(TIMEOUT)}, broadcast_ack_timeout_s=2.5
        ) as tb:
            await tb.start_backend("hung", "1.0.0")
            started = trio.current_time()
            result = await tb.broker.broadcast(RELEASE)
            assert trio.current_time() - started == exactly(2.5)
            assert len(result.timeouts) == 1


async def test_a_late_ack_after_the_timeout_is_ignored(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # The release hook takes 3 s, the broadcast allows 1 s: a timeout (the SDK
    # bounds the hook by the broker's ACK timeout and cancels it), and nothing
    # late changes anything; the next broadcast runs at once in its own task.
    async def slow_release(prefix: str) -> None:
        await trio.sleep(3)

    service = FakeService(
        script=FakeBackendScript(on_release_handles=slow_release), idle_timeout_secs=3600
    )
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"slow": service}) as tb:
            fake = await tb.start_backend("slow", "1.0.0")
            started = trio.current_time()
            first = await tb.broker.broadcast(RELEASE, ack_timeout_s=1)
            assert trio.current_time() - started == exactly(1)
            assert len(first.timeouts) == 1
            second = await tb.broker.broadcast(RELEASE, ack_timeout_s=10)
            assert trio.current_time() - started == exactly(1 + 3)
            assert len(second.acks) == 1
            assert fake.received_operations == [RELEASE, RELEASE]


async def test_a_thousand_backends_fan_out_within_one_ack_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # 900 answer, 100 never do. No sockets per fake (listen=False) to stay light.
    fast = FakeService(script=FakeBackendScript(listen=False), idle_timeout_secs=3600)
    slow = FakeService(
        script=FakeBackendScript(listen=False, broadcast=TIMEOUT), idle_timeout_secs=3600
    )
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"fast": fast, "slow": slow}) as tb:
            for i in range(900):
                await tb.start_backend("fast", f"1.0.{i}")
            for i in range(100):
                await tb.start_backend("slow", f"1.0.{i}")
            assert len(tb.launcher.backends) == 1000
            started = trio.current_time()
            result = await tb.broker.broadcast(RELEASE)
            elapsed = trio.current_time() - started
            assert elapsed <= 1.1 * 5.0
            assert elapsed == exactly(5.0)
            assert len(result.acks) == 900
            assert len(result.timeouts) == 100
            assert not result.failures and not result.skipped_dead
            assert _pids(result.timeouts) == {f.pid for f in tb.launcher.live("slow")}


async def test_quiesce_broadcast_drains_every_backend_and_empties_the_registry(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    names = ["a", "b", "c"]
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {n: _service(ACK) for n in names}) as tb:
            fakes = await _start_all(tb, names)
            since = tb.mark()
            quiesce = rpbroker.Quiesce(rpbroker.QuiesceReason.MAINTENANCE)
            result = await tb.broker.broadcast(quiesce)
            assert len(result.acks) == 3
            for fake in fakes:
                assert await fake.wait_exited() == 0
                assert fake.received_operations == [quiesce]
            for _ in names:
                await tb.wait_event(EventKind.STOPPED)
            assert len(tb.events_of(EventKind.DRAINING, since=since)) == 3
            assert list(tb.broker.backends) == []
            assert tb.events_of(EventKind.CRASHED) == []


async def test_backend_dying_on_quiesce_is_reported_dead_not_crashed(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, {"dies": _service(DEAD)}) as tb:
            fake = await tb.start_backend("dies", "1.0.0")
            started = trio.current_time()
            result = await tb.broker.broadcast(rpbroker.Quiesce(rpbroker.QuiesceReason.MAINTENANCE))
            assert trio.current_time() == exactly(started)
            assert _pids(result.skipped_dead) == {fake.pid}
            stopped = await tb.wait_event(EventKind.STOPPED)
            assert stopped.pid == fake.pid
            assert tb.events_of(EventKind.CRASHED) == []


async def test_fanout_benchmark_reports_one_ack_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        report = await fanout_benchmark(50, timeout_fraction=0.2, ack_timeout_s=0.5)
    assert report == {
        "backends": 50,
        "acks": 40,
        "timeouts": 10,
        "elapsed_ms": 500.0,
        "ack_timeout_ms": 500.0,
        "ratio_to_ack_timeout": 1.0,
    }
