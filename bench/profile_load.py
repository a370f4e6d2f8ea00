"""Steady load on one route for profiling: ``python -m bench.profile_load ROUTE``.

What this does: starts the real broker with its echo backend (or, with
``--server prototype``, the bare prototype), then drives ROUTE for as long as
asked: ``hello16`` (the lean generator, 16 clients), or any route of
``bench.route_client`` (one connection after another, from a process of its
own). While it runs it prints the pids; with ``--tool`` it attaches a profiler to
the broker and the backend for the whole run and leaves the output in
``--out``: ``py-spy`` (collapsed stacks, ``py-spy record --format raw``) or
``strace`` (``strace -c -f``, per-syscall counts). At the end it prints how many
connections were made, so counts can be divided per connection.

What it does not do: install the tools (``pip install py-spy`` into the venv;
Debian's ``strace``), or interpret their output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from bench.procs import REPO, BrokerProcess, ServerProcess, child_env, python_module
from bench.route_client import SDK_ROUTES, WIRE_ROUTES
from bench.routes import RouteClientProcess
from bench.wire_client import WireClient

#: Connections per request to the route client while profiling.
_BLOCK = 200


def _attach(tool: str, pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    if tool == "py-spy":
        exe = shutil.which("py-spy") or str(Path(REPO / ".venv" / "bin" / "py-spy"))
        argv = [exe, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw"]
        argv += ["--duration", str(int(seconds)), "--output", str(out)]
    else:
        argv = ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_load")
    parser.add_argument("route", choices=["hello16", *WIRE_ROUTES, *SDK_ROUTES])
    parser.add_argument("--server", choices=["broker", "prototype"], default="broker")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tool", choices=["none", "py-spy", "strace"], default="none")
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    args = parser.parse_args(argv)
    server: ServerProcess
    if args.server == "broker":
        broker = BrokerProcess()
        broker.start_broker()
        server = broker
    else:
        server = ServerProcess("prototype")
        server.start(python_module("bench.prototypes.mini_broker", server.socket, str(server.root)))
    tools: list[subprocess.Popen[bytes]] = []
    try:
        WireClient(server.socket, "echo", "1.0.0").hello()  # spawn the backend
        backend = server.only_child()
        print(json.dumps({"broker_pid": server.pid, "backend_pid": backend}), flush=True)
        if args.tool != "none":
            for name, pid in (("broker", server.pid), ("backend", backend)):
                out = args.out / f"{args.route}-{args.server}-{name}.{args.tool}.txt"
                tools.append(_attach(args.tool, pid, out, args.seconds))
            time.sleep(1.0)  # let the tracers attach
        done = 0
        deadline = time.perf_counter() + args.seconds
        if args.route == "hello16":
            while time.perf_counter() < deadline:
                out_json = subprocess.run(
                    python_module("bench.hello_load", server.socket, "16", "20000"),
                    capture_output=True,
                    check=True,
                    cwd=REPO,
                    env=child_env(None),
                ).stdout
                done += json.loads(out_json)["hellos"]
        else:
            client = RouteClientProcess(server.socket)
            try:
                while time.perf_counter() < deadline:
                    client.block(args.route, _BLOCK)
                    done += _BLOCK
            finally:
                client.close()
        print(json.dumps({"connections": done}), flush=True)
    finally:
        for tool in tools:
            tool.send_signal(2)  # SIGINT: both tools write their report and exit
            tool.wait(timeout=60)
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
