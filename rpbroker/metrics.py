"""Broker metrics in the frozen v1 names, rendered as OpenMetrics text.

What this module does: counts Hellos (by service, version, outcome) with a
duration histogram, spawn attempts, and renders the eight frozen metric families
of facts §9 in their fixed order, with values, ending in ``# EOF``.

What it does not do: sample anything by itself; the broker passes gauges in when
rendering.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

PREFIX = "running_process_broker_v1_"

#: The frozen metric families in render order: (suffix, type).
FAMILIES: tuple[tuple[str, str], ...] = (
    ("hello_total", "counter"),
    ("hello_duration_seconds", "histogram"),
    ("active_backends", "gauge"),
    ("spawn_attempts_total", "counter"),
    ("spawn_budget_remaining", "gauge"),
    ("connections_open", "gauge"),
    ("fd_usage_ratio", "gauge"),
    ("uptime_seconds", "gauge"),
)

#: Hello duration histogram bucket bounds, seconds.
HELLO_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def _labels(**labels: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


class BrokerMetrics:
    """Counters the broker updates as it works."""

    def __init__(self) -> None:
        self.hello_total: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._duration_buckets: dict[str, list[int]] = {}
        self._duration_sum: dict[str, float] = collections.defaultdict(float)
        self._duration_count: collections.Counter[str] = collections.Counter()
        self.spawn_attempts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        #: rpbroker's own counters (not frozen v1 names).
        self.handoff_plans: collections.Counter[str] = collections.Counter()
        self.handoff_results: collections.Counter[str] = collections.Counter()
        self.connection_errors = 0

    def hello(
        self, service: str, version: str, outcome: str, duration_s: float | None = None
    ) -> None:
        self.hello_total[(service, version, outcome)] += 1
        if duration_s is not None:
            buckets = self._duration_buckets.setdefault(service, [0] * len(HELLO_BUCKETS_S))
            for i, bound in enumerate(HELLO_BUCKETS_S):
                if duration_s <= bound:
                    buckets[i] += 1
            self._duration_sum[service] += duration_s
            self._duration_count[service] += 1

    def spawn(self, service: str, version: str, outcome: str) -> None:
        self.spawn_attempts[(service, version, outcome)] += 1

    def handoff_plan(self, plan: str) -> None:
        """One handoff plan: ``attempt`` or the fallback reason."""
        self.handoff_plans[plan] += 1

    def handoff_result(self, result: str) -> None:
        """One attempt's end: ``completed`` or the failure."""
        self.handoff_results[result] += 1

    def connection_error(self) -> None:
        """A connection's handler raised (it alone was closed)."""
        self.connection_errors += 1

    def render(
        self,
        *,
        active_backends: Mapping[str, int],
        budget_remaining: Mapping[tuple[str, str], int],
        connections_open: int,
        fd_usage_ratio: float,
        uptime_seconds: float,
    ) -> str:
        lines: list[str] = []
        for suffix, kind in FAMILIES:
            name = PREFIX + suffix
            lines.append(f"# TYPE {name} {kind}")
            if suffix == "hello_total":
                for (svc, ver, outcome), n in sorted(self.hello_total.items()):
                    lines.append(f"{name}{_labels(service=svc, version=ver, outcome=outcome)} {n}")
            elif suffix == "hello_duration_seconds":
                for svc, buckets in sorted(self._duration_buckets.items()):
                    for bound, n in zip(HELLO_BUCKETS_S, buckets, strict=True):
                        lines.append(f"{name}_bucket{_labels(service=svc, le=repr(bound))} {n}")
                    count = self._duration_count[svc]
                    lines.append(f"{name}_bucket{_labels(service=svc, le='+Inf')} {count}")
                    lines.append(f"{name}_sum{_labels(service=svc)} {self._duration_sum[svc]:.6f}")
                    lines.append(f"{name}_count{_labels(service=svc)} {count}")
            elif suffix == "active_backends":
                for svc, n in sorted(active_backends.items()):
                    lines.append(f"{name}{_labels(service=svc)} {n}")
            elif suffix == "spawn_attempts_total":
                for (svc, ver, outcome), n in sorted(self.spawn_attempts.items()):
                    lines.append(f"{name}{_labels(service=svc, version=ver, outcome=outcome)} {n}")
            elif suffix == "spawn_budget_remaining":
                for (svc, ver), n in sorted(budget_remaining.items()):
                    lines.append(f"{name}{_labels(service=svc, version=ver)} {n}")
            elif suffix == "connections_open":
                lines.append(f"{name} {connections_open}")
            elif suffix == "fd_usage_ratio":
                lines.append(f"{name} {fd_usage_ratio:.6f}")
            else:
                lines.append(f"{name} {int(uptime_seconds)}")
        for name, counter, label in (
            ("rpbroker_handoff_plans_total", self.handoff_plans, "plan"),
            ("rpbroker_handoff_results_total", self.handoff_results, "result"),
        ):
            lines.append(f"# TYPE {name} counter")
            for value, n in sorted(counter.items()):
                lines.append(f"{name}{_labels(**{label: value})} {n}")
        lines.append("# TYPE rpbroker_connection_errors_total counter")
        lines.append(f"rpbroker_connection_errors_total {self.connection_errors}")
        lines.append("# EOF")
        return "\n".join(lines) + "\n"
