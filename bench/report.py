"""Markdown tables from a results document, for stdout and the README.

What this does: renders route latencies (each order and pooled, with the floor
ratio), CPU per connection per process and route, Hello throughput against the
minimal responder, the target rows with met / not met, and every other number as
``measure | value`` rows.

What it does not do: compute anything beyond display ratios already in the
results, or write files.
"""

from __future__ import annotations

from typing import Any

from bench.routes import FORWARD, REVERSE
from bench.stats import ratio

#: Display names of the routes, in table order.
ROUTE_LABELS = {
    "hello": "Hello -> Negotiated (lean client)",
    "floor": "floor: raw connect + 1 round trip (lean client)",
    "reconnect": "reconnect (lean client)",
    "handoff": "handoff, request after the EVENT (lean client)",
    "handoff_pipelined": "handoff, request behind the Hello (lean client)",
    "sdk_floor": "floor via transports.connect (trio)",
    "sdk_reconnect": "rpbroker.connect, reconnect",
    "sdk_handoff": "rpbroker.connect, handoff (initial_data pipelined)",
    "sdk_hello_skip": "rpbroker.connect, Hello-skip",
}


def _cell(row: dict[str, Any] | None, key: str) -> str:
    return "-" if row is None else f"{row[key]:g}"


def route_table(section: dict[str, Any]) -> str:
    lines = [
        "| route | P50 fwd | P99 fwd | P50 rev | P99 rev | P50 | P99 | P50 / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    floor = section.get("floor", {}).get("all", {}).get("p50_us")
    for route in section["order"]:
        row = section[route]
        pooled = row["all"]
        over = "-" if floor is None or route == "hello" else f"{ratio(pooled['p50_us'], floor):g}"
        lines.append(
            f"| {ROUTE_LABELS.get(route, route)} | {_cell(row[FORWARD], 'p50_us')} | "
            f"{_cell(row[FORWARD], 'p99_us')} | {_cell(row[REVERSE], 'p50_us')} | "
            f"{_cell(row[REVERSE], 'p99_us')} | {pooled['p50_us']:g} | {pooled['p99_us']:g} | "
            f"{over} |"
        )
    return "\n".join(lines)


def cpu_table(section: dict[str, Any]) -> str:
    lines = [
        "| route | client | broker | backend | total | total / reconnect |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    reconnect = section.get("reconnect", {}).get("cpu_us_per_connection", {}).get("total")
    for route in section["order"]:
        cpu = section[route]["cpu_us_per_connection"]
        over = "-" if reconnect is None else f"{ratio(cpu['total'], reconnect):g}"
        lines.append(
            f"| {ROUTE_LABELS.get(route, route)} | {cpu['client']:g} | {cpu['broker']:g} | "
            f"{cpu['backend']:g} | {cpu['total']:g} | {over} |"
        )
    return "\n".join(lines)


def hello_table(section: dict[str, Any]) -> str:
    lines = [
        "| server | clients | Hellos/s | server CPU µs/Hello | rate / responder | "
        "CPU / responder |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in section["servers"]:
        for key, row in section[name].items():
            lines.append(
                f"| {name} | {key.split('_')[0]} | {row['hellos_per_s']} | "
                f"{row['server_cpu_us_per_hello']:g} | {row.get('rate_vs_reference', 1.0):g} | "
                f"{row.get('cpu_vs_reference', 1.0):g} |"
            )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for row in rows:
        measured = "-" if row["measured"] is None else f"{row['measured']:g}"
        met = {True: "met", False: "NOT MET", None: "not measured"}[row["met"]]
        lines.append(f"| {row['name']} | {measured} | {row['goal']} | {met} |")
    return "\n".join(lines)


def values_table(results: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            lines.append(f"| {prefix} | {value} |")

    walk("", results)
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    machine = results["machine"]
    parts = [
        f"Machine: {machine['cpus']} CPUs, Python {machine['python']}, load average "
        f"{machine['load_before']} before and {machine['load_after']} after the run"
        + (" (quick run: small samples)" if machine["quick"] else "")
        + ".",
    ]
    for key, title in (
        ("routes", "rpbroker"),
        ("prototype_routes", "prototype (the bound)"),
        ("prototype_backend_reply_routes", "prototype, backend writes the reply"),
    ):
        if key in results:
            parts += [
                f"\n### Route latency, µs: {title}\n",
                route_table(results[key]),
                f"\n### CPU per connection, µs: {title}\n",
                cpu_table(results[key]),
            ]
    if "hello" in results:
        parts += ["\n### Hellos per second, one lean generator\n", hello_table(results["hello"])]
    parts += ["\n### Targets\n", targets_table(results["targets"])]
    others = {k: v for k, v in results.items() if k in ("fanout", "policy", "startup")}
    if others:
        parts += ["\n### Fan-out, policy core, start-up\n", values_table(others)]
    return "\n".join(parts)
