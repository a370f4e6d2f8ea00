"""rpbroker benchmarks: ``python -m bench [--quick] [--only SECTION ...]``.

What this does: measures, in one run on this machine, the numbers SPEC §10 asks
for and writes them to ``bench/results/latest.json`` plus a Markdown table on
stdout. Every comparison is a ratio of two numbers taken in the same run.

- routes: latency from ``connect()`` to the first byte echoed by the backend for
  the handoff, reconnect and Hello-skip routes, and the floor (a raw connect to
  the same backend plus one round trip, no broker). Broker and backend are real
  processes (``rpbroker serve``); the samples interleave the routes.
- hello: Hello -> Negotiated latency for a warm backend, and Hellos per second with
  1, 16 and 128 concurrent clients (a lean generator: pre-encoded Hello, raw
  sockets, no decoding, so the broker is what is measured).
- fanout: broadcast fan-out time to 10, 100 and 1000 in-process fake backends with
  10% of them never answering, as a ratio of the ACK timeout; and to real backend
  processes.
- policy: per-operation cost of the pending-ACK registry and fallback state at 1k
  and 100k entries.
- startup: broker cold start (interpreter + import + bind + ready) and broker
  memory per idle connection.

What it does not do: assert anything. Tests never time; this only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import rpbroker
import transports
from rpbroker.client import forget_cached_endpoints, hello_frame

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ECHO_BACKEND = REPO / "examples" / "echo_backend.py"


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile (facts §3.11): index ceil(n*p/100) - 1."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def summary_us(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": round(percentile(samples, 50) * 1e6, 1),
        "p99_us": round(percentile(samples, 99) * 1e6, 1),
        "n": len(samples),
    }


class BrokerProcess:
    """``rpbroker serve`` in a private temporary directory, with an echo service."""

    def __init__(self, *, services: int = 1) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rpb-bench-", dir="/tmp"))
        self.root.chmod(0o700)
        self.services_dir = self.root / "svc"
        self.services_dir.mkdir(mode=0o700)
        definition = self.services_dir / "echo.toml"
        definition.write_text(
            f'service_name = "echo"\ncommand = ["{sys.executable}", "{ECHO_BACKEND}"]\n'
            "idle_timeout_secs = 3600\n"
        )
        definition.chmod(0o600)  # definitions must be private to the broker's user
        self.socket = str(self.root / "broker.sock")
        self.process: trio.Process | None = None
        self.ready_after_s = 0.0

    async def start(self) -> None:
        started = time.perf_counter()
        self.process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "rpbroker",
                "serve",
                "--socket",
                self.socket,
                "--services",
                str(self.services_dir),
                "--runtime-dir",
                str(self.root),
                "--log-level",
                "WARNING",
                "--hello-rate-limit",
                "100000000",
                "--hello-timeout",
                "600",
            ],
            stderr=subprocess.PIPE,
        )
        assert self.process.stderr is not None
        seen = b""
        while b"serving on" not in seen:
            chunk = await self.process.stderr.receive_some()
            if not chunk:
                raise RuntimeError(f"broker failed to start: {seen.decode()}")
            seen += chunk
        self.ready_after_s = time.perf_counter() - started

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


async def first_echo(stream: trio.abc.Stream) -> None:
    data = await stream.receive_some(1)
    if data != b"x":
        raise RuntimeError(f"unexpected echo {data!r}")


async def bench_routes(samples: int) -> dict[str, Any]:
    broker = BrokerProcess()
    await broker.start()
    try:
        forget_cached_endpoints()

        async def via(handoff: bool, skip: bool) -> tuple[float, rpbroker.Route, str]:
            if not skip:
                forget_cached_endpoints()
            started = time.perf_counter()
            stream = await rpbroker.open_connection(
                "echo",
                "1.0.0",
                broker=broker.socket,
                handoff=handoff,
                hello_skip=skip,
                initial_data=b"x",
            )
            await first_echo(stream)
            elapsed = time.perf_counter() - started
            await stream.aclose()
            return elapsed, stream.route, stream.endpoint

        _, _, endpoint = await via(False, False)  # spawn and warm
        for _ in range(20):
            await via(True, False)
            await via(False, False)

        async def floor() -> float:
            started = time.perf_counter()
            stream = await transports.connect(endpoint)
            await stream.send_all(b"x")
            await first_echo(stream)
            elapsed = time.perf_counter() - started
            await stream.aclose()
            return elapsed

        results: dict[str, list[float]] = {
            "handoff": [],
            "reconnect": [],
            "hello_skip": [],
            "floor": [],
        }
        for _ in range(samples):
            elapsed, route, _ = await via(True, False)
            assert route is rpbroker.Route.HANDOFF, route
            results["handoff"].append(elapsed)
            elapsed, route, _ = await via(False, False)
            assert route is rpbroker.Route.RECONNECT, route
            results["reconnect"].append(elapsed)
            await via(False, False)  # repopulate the cache for the skip sample
            elapsed, route, _ = await via(False, True)
            assert route is rpbroker.Route.HELLO_SKIP, route
            results["hello_skip"].append(elapsed)
            results["floor"].append(await floor())
        out: dict[str, Any] = {name: summary_us(values) for name, values in results.items()}
        out["handoff_over_reconnect_p50"] = round(
            out["handoff"]["p50_us"] / out["reconnect"]["p50_us"], 3
        )
        out["handoff_over_reconnect_p99"] = round(
            out["handoff"]["p99_us"] / out["reconnect"]["p99_us"], 3
        )
        out["reconnect_over_floor_p50"] = round(
            out["reconnect"]["p50_us"] / out["floor"]["p50_us"], 3
        )
        return out
    finally:
        await broker.stop()


async def lean_hello(path: str, hello: bytes) -> float:
    started = time.perf_counter()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
        await sock.send(hello)
        got = b""
        while len(got) < 5 or len(got) < 5 + int.from_bytes(got[1:5], "little"):
            chunk = await sock.recv(65536)
            if not chunk:
                raise RuntimeError("broker closed without a reply")
            got += chunk
    finally:
        sock.close()
    return time.perf_counter() - started


async def bench_hello(samples: int, per_client: int) -> dict[str, Any]:
    broker = BrokerProcess()
    await broker.start()
    try:
        hello = hello_frame("echo", "1.0.0", handoff=False)
        await lean_hello(broker.socket, hello)  # spawn the backend
        for _ in range(50):
            await lean_hello(broker.socket, hello)
        latencies = [await lean_hello(broker.socket, hello) for _ in range(samples)]
        out: dict[str, Any] = {"hello_to_negotiated": summary_us(latencies)}
        for clients in (1, 16, 128):
            count = per_client * 16 // clients if clients > 1 else per_client * 4

            async def worker(n: int = count) -> None:
                for _ in range(n):
                    await lean_hello(broker.socket, hello)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(clients):
                    nursery.start_soon(worker)
            elapsed = time.perf_counter() - started
            out[f"hellos_per_s_{clients}_clients"] = round(clients * count / elapsed)
        return out
    finally:
        await broker.stop()


async def bench_fanout(real_backends: int) -> dict[str, Any]:
    from rpbroker.testing import fanout_benchmark

    out: dict[str, Any] = {}
    for count in (10, 100, 1000):
        out[f"fakes_{count}"] = await fanout_benchmark(
            count, timeout_fraction=0.1, ack_timeout_s=0.5
        )
    out[f"real_{real_backends}"] = await _fanout_real(real_backends)
    return out


async def _fanout_real(count: int) -> dict[str, Any]:
    broker = BrokerProcess()
    await broker.start()
    try:
        for i in range(count):
            stream = await rpbroker.open_connection(
                "echo", f"1.0.{i}", broker=broker.socket, hello_skip=False
            )
            await stream.aclose()
        from rpbroker.admin_client import broadcast_request

        ack_timeout = 2.0
        started = time.perf_counter()
        document = await broadcast_request(
            broker.socket, rpbroker.ReleaseHandles("/nonexistent"), ack_timeout_s=ack_timeout
        )
        elapsed = time.perf_counter() - started
        return {
            "backends": count,
            "acks": len(document["acks"]),
            "timeouts": len(document["timeouts"]),
            "elapsed_ms": round(elapsed * 1000, 2),
        }
    finally:
        await broker.stop()


def bench_policy() -> dict[str, Any]:
    from rpbroker.policy.ack import AckRegistry, BackendRef
    from rpbroker.policy.fallback import FallbackPolicy, FallbackState
    from rpbroker.policy.tokens import TokenStore

    def per_op(fn: Callable[[], None], ops: int) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) / ops * 1e9

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

        state = FallbackState(FallbackPolicy(max_failed_attempts=8, window_s=3600))
        for i in range(size):
            state.record_failure(("k", i), 0.0)
        keys = [("p", i) for i in range(probes)]

        def fallback_cycle(state: FallbackState = state, keys: list[Any] = keys) -> None:
            for key in keys:
                state.record_failure(key, 1.0)
                state.should_attempt(key, _inputs(), 1.0)
                state.record_success(key)

        out[f"ack_register_acknowledge_ns_{size}"] = round(per_op(ack_cycle, probes))
        out[f"fallback_cycle_ns_{size}"] = round(per_op(fallback_cycle, probes))
    out["ack_ratio_100k_over_1k"] = round(
        out["ack_register_acknowledge_ns_100000"] / out["ack_register_acknowledge_ns_1000"], 3
    )
    out["fallback_ratio_100k_over_1k"] = round(
        out["fallback_cycle_ns_100000"] / out["fallback_cycle_ns_1000"], 3
    )
    return out


def _inputs() -> Any:
    from rpbroker.policy.fallback import HandoffInputs

    return HandoffInputs(
        client_opted_in=True, service_allows=True, fd_pressure=False, backend_adopted=False
    )


async def bench_startup(idle_connections: int) -> dict[str, Any]:
    cold: list[float] = []
    for _ in range(3):
        broker = BrokerProcess()
        await broker.start()
        cold.append(broker.ready_after_s)
        await broker.stop()
    broker = BrokerProcess()
    await broker.start()
    try:
        before = broker.rss_kib()
        held: list[trio.SocketStream] = []
        for _ in range(idle_connections):
            held.append(await transports.connect(broker.socket))
        # Let the broker accept them all (each becomes a task waiting for a frame).
        status = await _status(broker.socket)
        while status["connections_open"] < idle_connections:
            await trio.sleep(0.05)
            status = await _status(broker.socket)
        after = broker.rss_kib()
        for stream in held:
            await stream.aclose()
        return {
            "cold_start_ms_median": round(sorted(cold)[1] * 1000, 1),
            "idle_connections": idle_connections,
            "rss_per_idle_connection_kib": round((after - before) / idle_connections, 2),
        }
    finally:
        await broker.stop()


async def _status(path: str) -> dict[str, Any]:
    from rpbroker.admin_client import admin_request
    from rpbroker.wire.codes import AdminVerb

    reply = await admin_request(path, AdminVerb.STATUS, json_output=True)
    document: dict[str, Any] = json.loads(reply.body)
    return document


def table(results: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            lines.append(f"| {prefix} | {value} |")

    walk("", {k: v for k, v in results.items() if k != "machine"})
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    chosen = args.only or ["routes", "hello", "fanout", "policy", "startup"]
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "quick": quick,
        }
    }
    if "routes" in chosen:
        results["routes"] = await bench_routes(50 if quick else 500)
    if "hello" in chosen:
        results["hello"] = await bench_hello(100 if quick else 2000, 20 if quick else 200)
    if "fanout" in chosen:
        results["fanout"] = await bench_fanout(4 if quick else 20)
    if "policy" in chosen:
        results["policy"] = bench_policy()
    if "startup" in chosen:
        results["startup"] = await bench_startup(50 if quick else 1000)
    return results


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sample counts (smoke run)")
    parser.add_argument(
        "--only", nargs="+", choices=["routes", "hello", "fanout", "policy", "startup"]
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    results = trio.run(main, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(table(results))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
