"""The benchmark sections that measure one thing each: fan-out, policy core, start-up.

What this does:
- fanout: broadcast fan-out time to 10, 100 and 1000 in-process fake backends with
  10% of them never answering, as a ratio of the ACK timeout; and to real backend
  processes of a real broker.
- policy: per-operation cost of the pending-ACK registry and of the fallback
  state at 1k and 100k entries, and the 100k/1k ratio (flat means ~1).
- startup: broker cold start (interpreter + import + bind + ready; median of
  three) and broker memory per idle connection.

What it does not do: the route, CPU and Hello-throughput measurements
(``bench.routes``, ``bench.hello``), or judge anything (``bench.targets``).
"""

from __future__ import annotations

import functools
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

import rpbroker
from bench.procs import BrokerProcess
from bench.stats import ratio
from bench.wire_client import WireClient

#: How long memory-per-connection waits for the broker to have accepted every
#: idle connection, seconds.
IDLE_ACCEPT_TIMEOUT_S = 30.0


def bench_fanout(real_backends: int) -> dict[str, Any]:
    from rpbroker.testing import fanout_benchmark

    out: dict[str, Any] = {}
    for count in (10, 100, 1000):
        out[f"fakes_{count}"] = trio.run(
            functools.partial(fanout_benchmark, count, timeout_fraction=0.1, ack_timeout_s=0.5)
        )
    out[f"real_{real_backends}"] = _fanout_real(real_backends)
    return out


def _fanout_real(count: int) -> dict[str, Any]:
    from rpbroker.admin_client import broadcast_request

    broker = BrokerProcess()
    broker.start_broker()
    try:
        for i in range(count):
            WireClient(broker.socket, "echo", f"1.0.{i}").hello()  # spawns one backend each
        ack_timeout = 2.0

        async def broadcast() -> dict[str, Any]:
            document: dict[str, Any] = await broadcast_request(
                broker.socket, rpbroker.ReleaseHandles("/nonexistent"), ack_timeout_s=ack_timeout
            )
            return document

        started = time.perf_counter()
        document = trio.run(broadcast)
        elapsed = time.perf_counter() - started
        return {
            "backends": count,
            "acks": len(document["acks"]),
            "timeouts": len(document["timeouts"]),
            "elapsed_ms": round(elapsed * 1000, 2),
        }
    finally:
        broker.stop()


def bench_policy() -> dict[str, Any]:
    from rpbroker.policy.ack import AckRegistry, BackendRef
    from rpbroker.policy.fallback import (
        AttemptResult,
        FallbackPolicy,
        FallbackState,
        HandoffInputs,
    )
    from rpbroker.policy.tokens import TokenStore

    def per_op(fn: Callable[[], None], ops: int) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) / ops * 1e9

    inputs = HandoffInputs(
        client_opted_in=True, service_allows=True, fd_pressure=False, backend_adopted=False
    )
    out: dict[str, Any] = {}
    probes = 20000
    for size in (1000, 100_000):
        tokens = TokenStore(max_pending=size + probes + 10, ttl_s=3600)
        acks = AckRegistry(tokens, deadline_s=3600)
        backend = BackendRef("svc", 1)
        for _ in range(size):
            acks.register(tokens.issue(0.0), backend, 0.0)
        fresh = [tokens.issue(1.0) for _ in range(probes)]

        def ack_cycle(acks: AckRegistry = acks, fresh: list[Any] = fresh) -> None:
            for token in fresh:
                acks.register(token, BackendRef("svc", 1), 1.0)
                acks.acknowledge(token, 2.0)

        state: FallbackState[Any] = FallbackState(
            FallbackPolicy(max_failed_attempts=8, window_s=3600)
        )
        for i in range(size):
            state.attempt_started(("k", i))
            state.attempt_ended(("k", i), AttemptResult.FAILED, 0.0)
        keys = [("p", i) for i in range(probes)]

        def fallback_cycle(state: FallbackState[Any] = state, keys: list[Any] = keys) -> None:
            for key in keys:
                state.attempt_started(key)
                state.attempt_ended(key, AttemptResult.FAILED, 1.0)
                state.should_attempt(key, inputs, 1.0)
                state.attempt_started(key)
                state.attempt_ended(key, AttemptResult.SUCCEEDED, 1.0)

        out[f"ack_register_acknowledge_ns_{size}"] = round(per_op(ack_cycle, probes))
        out[f"fallback_cycle_ns_{size}"] = round(per_op(fallback_cycle, probes))
    out["ack_ratio_100k_over_1k"] = ratio(
        out["ack_register_acknowledge_ns_100000"], out["ack_register_acknowledge_ns_1000"]
    )
    out["fallback_ratio_100k_over_1k"] = ratio(
        out["fallback_cycle_ns_100000"], out["fallback_cycle_ns_1000"]
    )
    return out


def bench_startup(idle_connections: int) -> dict[str, Any]:
    cold: list[float] = []
    for _ in range(3):
        broker = BrokerProcess()
        broker.start_broker()
        cold.append(broker.ready_after_s)
        broker.stop()
    broker = BrokerProcess()
    broker.start_broker()
    held: list[socket.socket] = []
    try:
        before = broker.rss_kib()
        for _ in range(idle_connections):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(broker.socket)
            held.append(sock)
        # Let the broker accept them all (each becomes a task waiting for a frame).
        deadline = time.perf_counter() + IDLE_ACCEPT_TIMEOUT_S
        while _connections_open(broker.socket) < idle_connections:
            if time.perf_counter() > deadline:
                raise RuntimeError("the broker did not accept every idle connection")
            time.sleep(0.05)
        after = broker.rss_kib()
        return {
            "cold_start_ms_median": round(sorted(cold)[1] * 1000, 1),
            "idle_connections": idle_connections,
            "rss_per_idle_connection_kib": round((after - before) / idle_connections, 2),
        }
    finally:
        for sock in held:
            sock.close()
        broker.stop()


def _connections_open(path: str) -> int:
    from rpbroker.admin_client import admin_request
    from rpbroker.wire.codes import AdminVerb

    async def status() -> int:
        reply = await admin_request(path, AdminVerb.STATUS, json_output=True)
        document: dict[str, Any] = json.loads(reply.body)
        return int(document["connections_open"])

    return trio.run(status)
