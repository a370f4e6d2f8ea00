"""``fanout_benchmark``: broadcast fan-out to many in-process fake backends."""

from __future__ import annotations

from typing import Any

import trio

from rpbroker.policy.broadcast import ReleaseHandles

from ._backend import TIMEOUT, FakeBackendScript
from ._broker import FakeService, open_test_broker

#: The operation broadcast by ``fanout_benchmark``.
FANOUT_OPERATION = ReleaseHandles("/nonexistent/rpbroker-fanout-benchmark")


async def fanout_benchmark(
    count: int, *, timeout_fraction: float = 0.1, ack_timeout_s: float = 5.0
) -> dict[str, Any]:
    """Broadcast to ``count`` fake backends, a ``timeout_fraction`` of which never answer.

    Starts a test broker with ``count`` fakes (no sockets: ``listen=False``),
    broadcasts a release-handles operation with ``ack_timeout_s`` and returns
    ``backends``, ``acks``, ``timeouts``, ``elapsed_ms``, ``ack_timeout_ms`` and
    ``ratio_to_ack_timeout`` (SPEC §10's target: at most 1.1). Elapsed time is
    ``trio.current_time()``: real time under the default clock, virtual time
    under ``MockClock``.

    Cancellation: as ``open_test_broker``; every fake is gone when it returns or
    is cancelled.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    hung = round(count * timeout_fraction)
    services = {
        "fanout-ack": FakeService(script=FakeBackendScript(listen=False), idle_timeout_secs=86_400),
        "fanout-hung": FakeService(
            script=FakeBackendScript(listen=False, broadcast=TIMEOUT), idle_timeout_secs=86_400
        ),
    }
    async with open_test_broker(
        None,
        services,
        # Shutting down quiesces the hung fakes too: keep that short.
        broadcast_ack_timeout_s=ack_timeout_s,
        drain_timeout_s=min(1.0, ack_timeout_s),
        idle_check_enabled=False,
        hello_rate_limit=1_000_000,
    ) as test_broker:
        for i in range(count):
            name = "fanout-hung" if i < hung else "fanout-ack"
            await test_broker.start_backend(name, f"1.0.{i}")
        started = trio.current_time()
        result = await test_broker.broker.broadcast(FANOUT_OPERATION, ack_timeout_s=ack_timeout_s)
        elapsed = trio.current_time() - started
    return {
        "backends": count,
        "acks": len(result.acks),
        "timeouts": len(result.timeouts),
        "elapsed_ms": round(elapsed * 1000, 2),
        "ack_timeout_ms": round(ack_timeout_s * 1000, 2),
        "ratio_to_ack_timeout": round(elapsed / ack_timeout_s, 4),
    }
