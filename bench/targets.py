"""SPEC §10 / issue 13 targets: each a ratio from one run, with met / not met.

What this does: reads a results document and returns one row per target: what is
compared, the measured ratio, the goal, and whether it is met. A latency ratio
that is reported per route order is judged on the worse of the two orders. The
same route and Hello targets are also evaluated for the prototype (the bound),
so the report shows what this machine allows next to what the broker does.
Cold start and memory per connection are compared with ``bench/results/
baseline.json`` when it exists (allowing for noise), else reported as "no
baseline".

What it does not do: measure anything, or hide a missing section: a target whose
inputs were not measured in this run is listed with ``met: null``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from bench.routes import FORWARD, REVERSE
from bench.stats import ratio

#: A policy-core operation is "flat" if 100x more entries cost at most this much more.
POLICY_FLAT_RATIO = 1.5
#: Noise allowance for cold start and memory per connection against the baseline.
BASELINE_ALLOWANCE = 1.25


class Comparison(enum.Enum):
    AT_MOST = "<="
    BELOW = "<"
    AT_LEAST = ">="

    def holds(self, value: float, goal: float) -> bool:
        if self is Comparison.AT_MOST:
            return value <= goal
        if self is Comparison.BELOW:
            return value < goal
        return value >= goal


@attrs.frozen
class Target:
    name: str
    what: str
    comparison: Comparison
    goal: float
    measured: Callable[[dict[str, Any]], float]


def _latency(section: str, route: str, over: str, pct: str) -> Callable[[dict[str, Any]], float]:
    """Worse order's ``route / over`` ratio at percentile ``pct`` (``p50_us``/``p99_us``)."""

    def measured(results: dict[str, Any]) -> float:
        rows = results[section]
        return max(
            ratio(rows[route][order][pct], rows[over][order][pct]) for order in (FORWARD, REVERSE)
        )

    return measured


def _cpu(section: str, route: str, over: str) -> Callable[[dict[str, Any]], float]:
    def measured(results: dict[str, Any]) -> float:
        rows = results[section]
        return ratio(
            rows[route]["cpu_us_per_connection"]["total"],
            rows[over]["cpu_us_per_connection"]["total"],
        )

    return measured


def _hello(server: str, key: str) -> Callable[[dict[str, Any]], float]:
    def measured(results: dict[str, Any]) -> float:
        value: float = results["hello"][server]["16_clients"][key]
        return value

    return measured


def _path(*keys: str) -> Callable[[dict[str, Any]], float]:
    def measured(results: dict[str, Any]) -> float:
        value: Any = results
        for key in keys:
            value = value[key]
        return float(value)

    return measured


def _against(key: str, base: float) -> Callable[[dict[str, Any]], float]:
    def measured(results: dict[str, Any]) -> float:
        return ratio(results["startup"][key], base)

    return measured


def _route_targets(section: str, label: str) -> list[Target]:
    return [
        Target(
            f"{label}: reconnect P50 / floor P50",
            "reconnect route within 2.5x of the floor",
            Comparison.AT_MOST,
            2.5,
            _latency(section, "reconnect", "floor", "p50_us"),
        ),
        Target(
            f"{label}: pipelined handoff P50 / reconnect P50",
            "pipelined handoff strictly faster than reconnect (P50)",
            Comparison.BELOW,
            1.0,
            _latency(section, "handoff_pipelined", "reconnect", "p50_us"),
        ),
        Target(
            f"{label}: pipelined handoff P99 / reconnect P99",
            "pipelined handoff strictly faster than reconnect (P99)",
            Comparison.BELOW,
            1.0,
            _latency(section, "handoff_pipelined", "reconnect", "p99_us"),
        ),
        Target(
            f"{label}: pipelined handoff CPU / reconnect CPU",
            "client+broker+backend CPU per connection, at most 1.1x reconnect's",
            Comparison.AT_MOST,
            1.1,
            _cpu(section, "handoff_pipelined", "reconnect"),
        ),
    ]


def all_targets(baseline: dict[str, Any] | None) -> list[Target]:
    targets = [
        *_route_targets("routes", "broker"),
        Target(
            "broker: Hellos/s vs minimal responder, 16 clients",
            "at least the minimal trio responder's rate",
            Comparison.AT_LEAST,
            1.0,
            _hello("broker", "rate_vs_reference"),
        ),
        Target(
            "broker: CPU per Hello vs minimal responder, 16 clients",
            "at most the minimal trio responder's CPU per Hello",
            Comparison.AT_MOST,
            1.0,
            _hello("broker", "cpu_vs_reference"),
        ),
        Target(
            "fan-out to 1000 fakes / ACK timeout",
            "broadcast to 1000 backends within 1.1x the ACK timeout",
            Comparison.AT_MOST,
            1.1,
            _path("fanout", "fakes_1000", "ratio_to_ack_timeout"),
        ),
        Target(
            "ACK registry op, 100k / 1k entries",
            "flat per-operation cost",
            Comparison.AT_MOST,
            POLICY_FLAT_RATIO,
            _path("policy", "ack_ratio_100k_over_1k"),
        ),
        Target(
            "fallback state op, 100k / 1k entries",
            "flat per-operation cost",
            Comparison.AT_MOST,
            POLICY_FLAT_RATIO,
            _path("policy", "fallback_ratio_100k_over_1k"),
        ),
        *_route_targets("prototype_routes", "prototype"),
        *_route_targets("prototype_backend_reply_routes", "prototype, backend writes reply"),
        Target(
            "prototype: Hellos/s vs minimal responder, 16 clients",
            "the bound: a bare broker answering in its accept loop",
            Comparison.AT_LEAST,
            1.0,
            _hello("prototype", "rate_vs_reference"),
        ),
    ]
    if baseline is not None:
        for key in ("cold_start_ms_median", "rss_per_idle_connection_kib"):
            base = baseline.get("startup", {}).get(key)
            if base:
                targets.append(
                    Target(
                        f"{key} / baseline",
                        "no regression against bench/results/baseline.json (noise allowed)",
                        Comparison.AT_MOST,
                        BASELINE_ALLOWANCE,
                        _against(key, float(base)),
                    )
                )
    return targets


def evaluate(results: dict[str, Any], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per target: ``name``, ``what``, ``goal``, ``measured`` and ``met``."""
    rows = []
    for target in all_targets(baseline):
        try:
            value: float | None = target.measured(results)
        except (KeyError, TypeError):
            value = None  # that section was not run
        rows.append(
            {
                "name": target.name,
                "what": target.what,
                "goal": f"{target.comparison.value} {target.goal:g}",
                "measured": value,
                "met": None if value is None else target.comparison.holds(value, target.goal),
            }
        )
    return rows
