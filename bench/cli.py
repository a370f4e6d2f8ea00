"""``python -m bench``: run the sections, judge the targets, write JSON and Markdown.

What this does: starts the real broker (``rpbroker serve`` with an echo backend),
the minimal trio responder and the prototype broker (each a process of its own),
runs the chosen sections against them in one run, evaluates the targets and
writes ``bench/results/latest.json`` and a Markdown report on stdout. Every
comparison is a ratio of two numbers taken in this run; the load average before
and after is recorded, because the machine is shared.

What it does not do: assert anything (tests never time; this only reports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import hello, report, routes, sections, targets
from bench.procs import REPO, BrokerProcess, ServerProcess, python_module, require_linux_proc
from bench.route_client import SDK_ROUTES, WIRE_ROUTES
from bench.wire_client import WireClient

RESULTS = REPO / "bench" / "results"
SECTIONS = ("routes", "prototype", "hello", "fanout", "policy", "startup")
#: Prototype variants measured in the prototype section: name -> extra flags.
PROTOTYPE_VARIANTS = {
    "prototype_routes": (),
    "prototype_backend_reply_routes": ("--backend-writes-reply",),
}
#: Routes measured against the prototype: the lean client's only.
PROTOTYPE_ROUTES = WIRE_ROUTES
#: Warm-up connections per route before measuring, so caches and code paths are hot.
WARMUP_PER_ROUTE = 20


class Servers:
    """The server processes a run needs, started on first use and stopped at exit."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._started: dict[str, ServerProcess] = {}

    def broker(self) -> BrokerProcess:
        if "broker" not in self._started:
            broker = BrokerProcess()
            self._stack.callback(broker.stop)
            broker.start_broker()
            WireClient(broker.socket, "echo", "1.0.0").hello()  # spawn the backend
            self._started["broker"] = broker
        found = self._started["broker"]
        assert isinstance(found, BrokerProcess)
        return found

    def prototype(self, name: str = "prototype", *extra: str) -> ServerProcess:
        """The prototype broker started with ``extra`` flags, under ``name``."""
        if name not in self._started:
            server = ServerProcess(name)
            self._stack.callback(server.stop)
            server.start(
                python_module(
                    "bench.prototypes.mini_broker", server.socket, str(server.root), *extra
                )
            )
            self._started[name] = server
        return self._started[name]

    def responder(self) -> ServerProcess:
        if "responder" not in self._started:
            server = ServerProcess("responder")
            self._stack.callback(server.stop)
            server.start(python_module("bench.prototypes.responder", server.socket))
            self._started["responder"] = server
        return self._started["responder"]


def _route_section(
    server: ServerProcess, route_names: tuple[str, ...], samples: int, block: int
) -> dict[str, Any]:
    client = routes.RouteClientProcess(server.socket)
    try:
        for route in route_names:
            client.block(route, WARMUP_PER_ROUTE)
        return routes.measure_routes(
            client,
            {"broker": server.pid, "backend": server.only_child()},
            route_names,
            samples=samples,
            block=block,
        )
    finally:
        client.close()


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    quick: bool = args.quick
    chosen = args.only or list(SECTIONS)
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "quick": quick,
            "load_before": [round(x, 2) for x in os.getloadavg()],
        }
    }
    samples, block = (60, 10) if quick else (args.samples, args.block)
    with ExitStack() as stack:
        servers = Servers(stack)
        if "routes" in chosen:
            results["routes"] = _route_section(
                servers.broker(), WIRE_ROUTES + SDK_ROUTES, samples, block
            )
        if "prototype" in chosen:
            for key, flags in PROTOTYPE_VARIANTS.items():
                results[key] = _route_section(
                    servers.prototype(key, *flags), PROTOTYPE_ROUTES, samples, block
                )
        if "hello" in chosen:
            base = 400 if quick else 3000
            by_name = {
                "responder": servers.responder(),
                "broker": servers.broker(),
                "prototype": servers.prototype("prototype_routes"),
                "prototype_task": servers.prototype("prototype_task", "--task-per-hello"),
            }
            results["hello"] = hello.measure_hello(
                {name: (s.socket, s.pid) for name, s in by_name.items()},
                counts={1: base // 2, 16: base, 128: base},
                rounds=1 if quick else 3,
            )
    if "fanout" in chosen:
        results["fanout"] = sections.bench_fanout(4 if quick else 20)
    if "policy" in chosen:
        results["policy"] = sections.bench_policy()
    if "startup" in chosen:
        results["startup"] = sections.bench_startup(50 if quick else 1000)
    results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="rpbroker benchmarks (SPEC §10, issue 13)"
    )
    parser.add_argument("--quick", action="store_true", help="small sample counts (smoke run)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS)
    parser.add_argument("--samples", type=int, default=400, help="latency samples per route")
    parser.add_argument("--block", type=int, default=25, help="connections per route block")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--baseline", type=Path, default=REPO / "bench" / "baseline.json")
    args = parser.parse_args(argv)
    require_linux_proc()
    results = run_sections(args)
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else None
    results["targets"] = targets.evaluate(results, baseline)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(report.markdown(results))
    print(f"\nwritten to {args.output}")
    return 0
