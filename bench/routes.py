"""Route latency and CPU per connection, from an out-of-process client.

What this does: starts ``bench.route_client`` as a process of its own and asks it
for blocks of connections, route after route. Routes are rotated in blocks, and
the rotation runs forwards and backwards on alternate rounds, so whatever one
route leaves behind (a handoff's ACK tail lands after its client is done) falls
on a different neighbour in each order; both orders are reported. Every block
starts with one unrecorded warm-up connection. Around each block the CPU of the
client (measured by itself), the broker and the backend (``/proc``) is taken,
after a short settle so tails are counted in the block that caused them, minus
what the idle processes use in that time; the sum over blocks divided by the
connections gives µs per connection per process.

What it does not do: start the broker (the caller passes its socket and pids), or
judge the numbers (``bench.targets``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from bench.procs import REPO, CpuMeter, child_env, python_module
from bench.stats import NS_PER_US, summary_us

#: Pause after each block before its CPU is read, seconds: longer than the backend
#: SDK's bounded wait before it sends a HandoffAck (50 ms), so the broker's work on
#: the last ACK of a block is counted in that block.
SETTLE_S = 0.1
#: Idle measurement before the first block, seconds.
IDLE_WINDOW_S = 1.0
#: Quiet time before the idle measurement, seconds: longer than the backend SDK's
#: activity-report interval (1 s), so the warm-up's last report is not counted as idle.
IDLE_SETTLE_S = 1.5
#: Order names, as reported.
FORWARD, REVERSE = "forward", "reverse"


class RouteClientProcess:
    """The ``bench.route_client`` process and its line protocol."""

    def __init__(self, broker_socket: str) -> None:
        self.process = subprocess.Popen(
            python_module("bench.route_client", broker_socket),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=child_env(None),
        )
        hello = self._read()
        self.endpoint: str = hello["endpoint"]

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        return self.process.stdin, self.process.stdout

    def _read(self) -> dict[str, Any]:
        line = self._pipes()[1].readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"route client exited with status {code}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def block(self, route: str, n: int) -> tuple[list[int], int]:
        stdin, _ = self._pipes()
        stdin.write(json.dumps({"route": route, "n": n}).encode() + b"\n")
        stdin.flush()
        answer = self._read()
        return answer["ns"], answer["cpu_ns"]

    def close(self) -> None:
        stdin, _ = self._pipes()
        try:
            stdin.write(b'{"route": "quit"}\n')
            stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def idle_rates(pids: Mapping[str, int], window_s: float = IDLE_WINDOW_S) -> dict[str, float]:
    """CPU each process uses while nothing is asked of it, ns per second."""
    time.sleep(IDLE_SETTLE_S)
    meter = CpuMeter(pids)
    meter.start()
    started = time.perf_counter()
    time.sleep(window_s)
    spent = meter.stop()
    elapsed = time.perf_counter() - started
    return {name: ns / elapsed for name, ns in spent.items()}


def measure_routes(
    client: RouteClientProcess,
    servers: Mapping[str, int],
    routes: Sequence[str],
    *,
    samples: int,
    block: int,
) -> dict[str, Any]:
    """Latency (per order and pooled) and CPU per connection for each route.

    ``servers`` names the server-side processes to meter (``broker``, ``backend``).
    """
    idle = idle_rates(servers)
    meter = CpuMeter(servers)
    blocks_per_route = max(1, -(-samples // block))
    latencies: dict[str, dict[str, list[int]]] = {r: {FORWARD: [], REVERSE: []} for r in routes}
    cpu_ns: dict[str, dict[str, float]] = {
        r: {name: 0.0 for name in ("client", *servers)} for r in routes
    }
    connections = dict.fromkeys(routes, 0)
    for round_ in range(blocks_per_route):
        order = FORWARD if round_ % 2 == 0 else REVERSE
        for route in routes if order == FORWARD else list(reversed(routes)):
            meter.start()
            started = time.perf_counter()
            ns, client_cpu = client.block(route, block + 1)
            time.sleep(SETTLE_S)
            spent = meter.stop()
            window = time.perf_counter() - started
            latencies[route][order].extend(ns[1:])  # the first one warms up
            connections[route] += len(ns)
            cpu_ns[route]["client"] += client_cpu
            for name, value in spent.items():
                cpu_ns[route][name] += max(0.0, value - idle[name] * window)
    out: dict[str, Any] = {
        "order": list(routes),
        "block": block,
        "idle_cpu_us_per_s": {name: round(rate / NS_PER_US, 1) for name, rate in idle.items()},
    }
    for route in routes:
        forward, reverse = latencies[route][FORWARD], latencies[route][REVERSE]
        per_conn = {
            name: round(total / connections[route] / NS_PER_US, 1)
            for name, total in cpu_ns[route].items()
        }
        per_conn["total"] = round(sum(cpu_ns[route].values()) / connections[route] / NS_PER_US, 1)
        out[route] = {
            "all": summary_us(forward + reverse),
            FORWARD: summary_us(forward) if forward else None,
            REVERSE: summary_us(reverse) if reverse else None,
            "cpu_us_per_connection": per_conn,
        }
    return out
