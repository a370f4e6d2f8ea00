"""Hellos per second and server CPU per Hello, for several servers under one generator.

What this does: runs ``bench.hello_load`` (a process of its own) against each
server in turn, for 1, 16 and 128 concurrent clients, over several rounds whose
server order alternates, and reads each server's CPU from ``/proc`` around every
run. Reports the median Hellos/s and the CPU per Hello (all rounds pooled) of
each server, the generator's own CPU per Hello, and every server's ratios to the
first one's (the minimal responder, the comparison point of the target).

What it does not do: start the servers (the caller passes name -> (socket, pid)),
or judge the numbers (``bench.targets``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from bench.procs import REPO, CpuMeter, child_env, python_module
from bench.stats import NS_PER_US, ratio

#: Concurrent client counts, as SPEC §10 asks.
CLIENT_COUNTS = (1, 16, 128)


def one_run(socket_path: str, pid: int, clients: int, count: int) -> dict[str, Any]:
    """One generator run: its report plus ``server_cpu_ns``."""
    meter = CpuMeter({"server": pid})
    meter.start()
    out = subprocess.run(
        python_module("bench.hello_load", socket_path, str(clients), str(count)),
        capture_output=True,
        check=False,
        cwd=REPO,
        env=child_env(None),
    )
    spent = meter.stop()
    if out.returncode != 0:
        raise RuntimeError(f"hello_load failed: {out.stderr.decode(errors='replace')}")
    report: dict[str, Any] = json.loads(out.stdout)
    report["server_cpu_ns"] = spent["server"]
    return report


def measure_hello(
    servers: Mapping[str, tuple[str, int]],
    *,
    counts: Mapping[int, int],
    rounds: int,
    client_counts: Sequence[int] = CLIENT_COUNTS,
) -> dict[str, Any]:
    """Hellos/s and CPU per Hello per server and client count; ratios to the first server."""
    names = list(servers)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {c: [] for c in client_counts} for name in names
    }
    for round_ in range(rounds):
        for clients in client_counts:
            order = names if round_ % 2 == 0 else list(reversed(names))
            for name in order:
                socket_path, pid = servers[name]
                runs[name][clients].append(one_run(socket_path, pid, clients, counts[clients]))
    out: dict[str, Any] = {"rounds": rounds, "servers": names}
    for name in names:
        rows: dict[str, Any] = {}
        for clients in client_counts:
            got = runs[name][clients]
            hellos = sum(r["hellos"] for r in got)
            rows[f"{clients}_clients"] = {
                "hellos_per_s": round(statistics.median(r["per_s"] for r in got)),
                "server_cpu_us_per_hello": round(
                    sum(r["server_cpu_ns"] for r in got) / hellos / NS_PER_US, 1
                ),
                "generator_cpu_us_per_hello": round(
                    sum(r["cpu_ns"] for r in got) / hellos / NS_PER_US, 1
                ),
            }
        out[name] = rows
    reference = out[names[0]]
    for name in names[1:]:
        for clients in client_counts:
            row, ref = out[name][f"{clients}_clients"], reference[f"{clients}_clients"]
            row["rate_vs_reference"] = ratio(row["hellos_per_s"], ref["hellos_per_s"])
            row["cpu_vs_reference"] = ratio(
                row["server_cpu_us_per_hello"], ref["server_cpu_us_per_hello"]
            )
    return out
