"""The measuring client: a process of its own running blocks of connections on request.

Run as ``python -m bench.route_client BROKER_SOCKET``. It reads one JSON command per
line on stdin, ``{"route": NAME, "n": COUNT}``, opens COUNT connections by that
route one after the other, and answers with one JSON line: the latency of each
connection in ns and the CPU this process spent on the block (ns, measured around
the connections only). ``{"route": "quit"}`` ends it.

Routes: ``hello`` (Hello -> Negotiated only), ``floor``, ``reconnect``, ``handoff``,
``handoff_pipelined`` use the lean blocking client (``bench.wire_client``); the
``sdk_*`` routes time ``rpbroker.open_connection`` itself, in a trio run, exactly as
a user calls it: ``sdk_reconnect`` (``handoff=False``), ``sdk_handoff`` (the
pipelined handoff its ``initial_data`` gives), ``sdk_hello_skip`` (cached endpoint)
and ``sdk_floor`` (``transports.connect`` + one round trip, the trio floor).

What it does not do: measure the broker or the backend (the orchestrator reads their
CPU from ``/proc`` around each block), or decide anything about the numbers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable

import trio

import rpbroker
import transports
from bench.wire_client import REQUEST, RouteError, WireClient
from rpbroker.endpoint_cache import EndpointCache

SERVICE = "echo"
VERSION = "1.0.0"

#: Lean-client routes (blocking sockets).
WIRE_ROUTES = ("hello", "floor", "reconnect", "handoff", "handoff_pipelined")
#: Routes through ``rpbroker.open_connection`` in trio.
SDK_ROUTES = ("sdk_floor", "sdk_reconnect", "sdk_handoff", "sdk_hello_skip")

_EXPECTED_ROUTE = {
    "sdk_reconnect": rpbroker.Route.RECONNECT,
    "sdk_handoff": rpbroker.Route.HANDOFF,
    "sdk_hello_skip": rpbroker.Route.HELLO_SKIP,
}


class SdkClient:
    """``rpbroker.open_connection`` per route, timed to the first echoed byte."""

    def __init__(self, broker: str, endpoint: str) -> None:
        self.broker = broker
        self.endpoint = endpoint
        # One cache for every block (each block is its own trio run, and a run's
        # default cache lives only as long as the run).
        self.cache = EndpointCache()

    async def one(self, route: str) -> int:
        """Latency of one connection by ``route``, ns.

        Cancellation: the connection is closed; nothing is left open.
        """
        started = time.perf_counter_ns()
        if route == "sdk_floor":
            stream: trio.abc.Stream = await transports.connect(self.endpoint)
            await stream.send_all(REQUEST)
        else:
            brokered = await rpbroker.open_connection(
                SERVICE,
                VERSION,
                broker=self.broker,
                handoff=route == "sdk_handoff",
                hello_skip=route == "sdk_hello_skip",
                initial_data=REQUEST,
                endpoint_cache=self.cache,
            )
            if brokered.route is not _EXPECTED_ROUTE[route]:
                await brokered.aclose()
                raise RouteError(f"{route} took the {brokered.route.value} route")
            stream = brokered
        async with stream:
            got = await stream.receive_some(1)
            elapsed = time.perf_counter_ns() - started
        if got != REQUEST:
            raise RouteError(f"expected the echo {REQUEST!r}, got {got!r}")
        return elapsed

    async def block(self, route: str, n: int) -> tuple[list[int], int]:
        """``n`` connections by ``route``: (latencies ns, CPU ns of this process).

        Cancellation: stops after the current connection, which is closed.
        """
        cpu = time.process_time_ns()
        samples = [await self.one(route) for _ in range(n)]
        return samples, time.process_time_ns() - cpu


def wire_block(client: WireClient, route: str, n: int) -> tuple[list[int], int]:
    """``n`` connections by a lean-client route: (latencies ns, CPU ns of this process)."""
    run: Callable[[], int] = getattr(client, route)
    cpu = time.process_time_ns()
    samples = [run() for _ in range(n)]
    return samples, time.process_time_ns() - cpu


def main(argv: list[str]) -> int:
    broker = argv[0]
    wire = WireClient(broker, SERVICE, VERSION)
    endpoint = wire.learn_endpoint()
    sdk = SdkClient(broker, endpoint)
    # Fill the client's endpoint cache once, for the Hello-skip route.
    trio.run(sdk.one, "sdk_reconnect")
    print(json.dumps({"ready": True, "endpoint": endpoint}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        route, n = command["route"], int(command.get("n", 0))
        if route == "quit":
            break
        if route in WIRE_ROUTES:
            samples, cpu_ns = wire_block(wire, route, n)
        elif route in SDK_ROUTES:
            block: Callable[[str, int], Awaitable[tuple[list[int], int]]] = sdk.block
            samples, cpu_ns = trio.run(block, route, n)
        else:
            raise SystemExit(f"unknown route {route!r}")
        print(json.dumps({"ns": samples, "cpu_ns": cpu_ns}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
