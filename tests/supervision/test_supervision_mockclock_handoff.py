"""Handoff ACK deadline and fallback (SPEC §5): every failure degrades to a working reconnect."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
import transports
from rpbroker.client import HANDOFF_EVENT_GRACE_S
from rpbroker.config import DEFAULT_HANDOFF_ADOPT_WINDOW_S
from rpbroker.events import EventKind
from rpbroker.testing import (
    FakeBackendScript,
    FakeService,
    HandoffBehaviour,
    MemoryControlChannel,
    TestBroker,
    open_test_broker,
)

from .conftest import LIMIT_S, exactly

SVC = "svc"
V1 = "1.0.0"


def _service(behaviour: HandoffBehaviour) -> dict[str, FakeService]:
    return {SVC: FakeService(script=FakeBackendScript(handoff=behaviour), idle_timeout_secs=3600)}


def _assert_no_pending_handoff(tb: TestBroker) -> None:
    assert len(tb.broker.handoff.acks) == 0
    assert len(tb.broker.handoff.tokens) == 0


async def test_adopting_backend_completes_the_handoff_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, _service(HandoffBehaviour.ADOPT)) as tb:
            fake = await tb.start_backend(SVC, V1)
            since = tb.mark()
            t0 = trio.current_time()
            async with await tb.connect(SVC, V1, initial_data=b"first") as stream:
                assert stream.route is rpbroker.Route.HANDOFF
                assert await stream.receive_some(5) == b"first"
                await stream.send_all(b"second")
                assert await stream.receive_some(6) == b"second"
            completed = await tb.wait_event(EventKind.HANDOFF_COMPLETED, since=since)
            assert completed.at == exactly(t0)
            assert completed.pid == fake.pid
            assert fake.offers_received == 1
            assert fake.handoffs_adopted == 1
            assert tb.events_of(EventKind.HANDOFF_FALLBACK) == []
            _assert_no_pending_handoff(tb)


async def test_never_acking_backend_falls_back_at_exactly_the_ack_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(
            tmp_path, _service(HandoffBehaviour.NEVER_ACK), ack_deadline_s=3
        ) as tb:
            fake = await tb.start_backend(SVC, V1)
            since = tb.mark()
            t0 = trio.current_time()
            wall_before = time.time()
            async with await tb.connect(SVC, V1, initial_data=b"once") as stream:
                # The client waits until the adoption deadline stated in the reply
                # (1.5 s) plus its grace (0.5 s), then reconnects. The deadline is
                # wall-clock, so the virtual wait is 2 s less the real time spent.
                waited = trio.current_time() - t0
                wall_spent = time.time() - wall_before
                window = DEFAULT_HANDOFF_ADOPT_WINDOW_S + HANDOFF_EVENT_GRACE_S
                assert window - wall_spent - 0.002 <= waited <= window + 1e-6
                assert stream.route is rpbroker.Route.RECONNECT
                assert await stream.receive_some(4) == b"once"
                fallback = await tb.wait_event(EventKind.HANDOFF_FALLBACK, since=since)
                assert fallback.at == exactly(t0 + 3)
                assert fallback.details["failure"] == "ack-timeout"
                assert fallback.details["fd_reached_backend"] is True
                assert "deadline" in fallback.reason
                # The reconnect route still works after the broker gave up.
                await stream.send_all(b"again")
                assert await stream.receive_some(5) == b"again"
            assert fake.offers_received == 1
            assert fake.connections_served == 1  # only the reconnected one
            _assert_no_pending_handoff(tb)


async def test_default_ack_deadline_is_five_seconds(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, _service(HandoffBehaviour.NEVER_ACK)) as tb:
            await tb.start_backend(SVC, V1)
            since = tb.mark()
            t0 = trio.current_time()
            async with await tb.connect(SVC, V1):
                pass
            fallback = await tb.wait_event(EventKind.HANDOFF_FALLBACK, since=since)
            assert fallback.at == exactly(t0 + 5)


async def test_rejecting_backend_falls_back_immediately(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, _service(HandoffBehaviour.REJECT)) as tb:
            fake = await tb.start_backend(SVC, V1)
            since = tb.mark()
            t0 = trio.current_time()
            async with await tb.connect(SVC, V1, initial_data=b"data") as stream:
                # Told at once by the backend: no handoff-ready timeout is spent.
                assert trio.current_time() == exactly(t0)
                assert stream.route is rpbroker.Route.RECONNECT
                assert await stream.receive_some(4) == b"data"
            fallback = await tb.wait_event(EventKind.HANDOFF_FALLBACK, since=since)
            assert fallback.at == exactly(t0)
            assert fallback.details["failure"] == "backend-rejected"
            assert "refused" in fallback.reason
            assert fake.handoffs_rejected == 1
            _assert_no_pending_handoff(tb)


async def test_failed_pass_falls_back_and_the_client_is_told_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, _service(HandoffBehaviour.ADOPT)) as tb:
            fake = await tb.start_backend(SVC, V1)
            handle = tb.handle(SVC, V1)
            assert handle is not None and handle.link is not None
            channel = handle.link.channel
            assert isinstance(channel, MemoryControlChannel)
            channel.fail_next_pass = transports.ConnectionPassError(
                transports.PassFailure.PERMISSION_DENIED, "injected by the test"
            )
            since = tb.mark()
            t0 = trio.current_time()
            async with await tb.connect(SVC, V1, initial_data=b"x") as stream:
                assert trio.current_time() == exactly(t0)
                assert stream.route is rpbroker.Route.RECONNECT
                assert await stream.receive_some(1) == b"x"
            fallback = await tb.wait_event(EventKind.HANDOFF_FALLBACK, since=since)
            assert fallback.details["failure"] == "pass-permission-denied"
            assert fallback.details["fallback"] == "permission_denied"
            assert fallback.details["fd_reached_backend"] is False
            assert fake.offers_received == 0
            _assert_no_pending_handoff(tb)


async def test_backend_crashing_on_the_offer_leaves_a_working_route(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, _service(HandoffBehaviour.CRASH)) as tb:
            first = await tb.start_backend(SVC, V1)
            tb.set_script(SVC, FakeBackendScript())  # the next incarnation behaves
            try:
                async with await tb.connect(SVC, V1, initial_data=b"abc") as stream:
                    # Negotiated again with the successor (which may adopt this one).
                    assert await stream.receive_some(3) == b"abc"
                    await stream.send_all(b"d")
                    assert await stream.receive_some(1) == b"d"
            except (rpbroker.BackendUnavailableError, rpbroker.RefusedError):
                pytest.fail("a crash mid-handoff must leave the client a working route")
            assert first.process.returncode == 1
            assert tb.events_of(EventKind.CRASHED)
            second = tb.launcher.backend(SVC)
            assert second.pid != first.pid
            assert second.connections_served == 1
            fallback = tb.events_of(EventKind.HANDOFF_FALLBACK)
            assert [e.pid for e in fallback] == [first.pid]


async def test_repeated_failures_stop_handoff_attempts_for_the_window(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # 8 failed attempts in 30 s: further clients are routed by reconnect without
    # an offer; the count clears after the window.
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, _service(HandoffBehaviour.REJECT)) as tb:
            fake = await tb.start_backend(SVC, V1)
            t0 = trio.current_time()
            for _ in range(10):
                async with await tb.connect(SVC, V1, hello_skip=False) as stream:
                    assert stream.route is rpbroker.Route.RECONNECT
            assert fake.offers_received == 8
            await trio.sleep_until(t0 + 30)
            async with await tb.connect(SVC, V1, hello_skip=False):
                pass
            assert fake.offers_received == 9


async def test_service_without_handoff_is_never_offered(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(
            tmp_path, {SVC: FakeService(handoff=False, idle_timeout_secs=3600)}
        ) as tb:
            fake = await tb.start_backend(SVC, V1)
            async with await tb.connect(SVC, V1, initial_data=b"r") as stream:
                assert stream.route is rpbroker.Route.RECONNECT
                assert stream.negotiated is not None
                assert stream.negotiated.handle_passed_token == b""
                assert await stream.receive_some(1) == b"r"
            assert fake.offers_received == 0
