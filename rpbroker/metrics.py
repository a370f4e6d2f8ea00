"""Broker metrics in the frozen v1 names, rendered as OpenMetrics text.

What this module does: counts Hellos (by service, version, outcome) with a
duration histogram, spawn attempts, and renders the eight frozen metric families
of facts §9 in their fixed order, with values, as valid OpenMetrics 1.0: each
family has ``# TYPE``, ``# HELP`` (and ``# UNIT`` where its name ends in one)
under the family name, which for a counter is the sample name without
``_total`` (``# TYPE running_process_broker_v1_hello counter`` above the
``running_process_broker_v1_hello_total`` samples); the sample names are the
frozen v1 ones, byte for byte; the text ends in ``# EOF``.

What it does not do: sample anything by itself; the broker passes gauges in when
rendering.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Mapping

import attrs

PREFIX = "running_process_broker_v1_"
#: Prefix of rpbroker's own metric families.
OWN_PREFIX = "rpbroker_"


class MetricKind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@attrs.frozen
class Family:
    """One metric family: its OpenMetrics name (without ``PREFIX``), type, help and unit."""

    name: str
    kind: MetricKind
    help: str
    unit: str | None = None
    prefix: str = PREFIX

    @property
    def family_name(self) -> str:
        """The name ``# TYPE``, ``# HELP`` and ``# UNIT`` use."""
        return self.prefix + self.name

    @property
    def sample_name(self) -> str:
        """The name of the family's samples (histograms add their suffixes)."""
        suffix = "_total" if self.kind is MetricKind.COUNTER else ""
        return self.prefix + self.name + suffix


def _family_header(family: Family) -> list[str]:
    """The ``# TYPE`` / ``# UNIT`` / ``# HELP`` lines of ``family``."""
    lines = [f"# TYPE {family.family_name} {family.kind.value}"]
    if family.unit is not None:
        lines.append(f"# UNIT {family.family_name} {family.unit}")
    lines.append(f"# HELP {family.family_name} {family.help}")
    return lines


#: The frozen metric families in render order (facts §9).
FAMILIES: tuple[Family, ...] = (
    Family("hello", MetricKind.COUNTER, "Hellos answered, by service, version and outcome."),
    Family(
        "hello_duration_seconds",
        MetricKind.HISTOGRAM,
        "Time from reading a Hello to its reply, by service.",
        "seconds",
    ),
    Family("active_backends", MetricKind.GAUGE, "Backends in the registry, by service."),
    Family(
        "spawn_attempts", MetricKind.COUNTER, "Backend spawns, by service, version and outcome."
    ),
    Family(
        "spawn_budget_remaining",
        MetricKind.GAUGE,
        "Spawns left in the current budget window, by service and version.",
    ),
    Family("connections_open", MetricKind.GAUGE, "Client connections the broker is serving."),
    Family("fd_usage_ratio", MetricKind.GAUGE, "Share of the descriptor limit in use."),
    Family("uptime_seconds", MetricKind.GAUGE, "Seconds since the broker started.", "seconds"),
)

#: rpbroker's own families, rendered after the frozen ones under their own prefix.
_HANDOFF_PLANS = Family(
    "handoff_plans",
    MetricKind.COUNTER,
    "Handoff plans for negotiated Hellos: attempt, or the reason for reconnecting.",
    prefix=OWN_PREFIX,
)
_HANDOFF_RESULTS = Family(
    "handoff_results",
    MetricKind.COUNTER,
    "Handoff attempts by how they ended: completed, or what went wrong.",
    prefix=OWN_PREFIX,
)
_CONNECTION_ERRORS = Family(
    "connection_errors",
    MetricKind.COUNTER,
    "Connections closed because serving them raised an unexpected error.",
    prefix=OWN_PREFIX,
)

#: The frozen v1 sample names, in order (renaming one requires protocol v2).
FROZEN_METRIC_NAMES: tuple[str, ...] = tuple(f.sample_name for f in FAMILIES)

#: Hello duration histogram bucket bounds, seconds.
HELLO_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def _label_value(value: str) -> str:
    """A label value escaped as OpenMetrics requires (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


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
        for family in FAMILIES:
            lines.extend(_family_header(family))
            name = family.sample_name
            if family.name == "hello":
                for (svc, ver, outcome), n in sorted(self.hello_total.items()):
                    lines.append(f"{name}{_labels(service=svc, version=ver, outcome=outcome)} {n}")
            elif family.name == "hello_duration_seconds":
                for svc, buckets in sorted(self._duration_buckets.items()):
                    for bound, n in zip(HELLO_BUCKETS_S, buckets, strict=True):
                        lines.append(f"{name}_bucket{_labels(service=svc, le=repr(bound))} {n}")
                    count = self._duration_count[svc]
                    lines.append(f"{name}_bucket{_labels(service=svc, le='+Inf')} {count}")
                    lines.append(f"{name}_sum{_labels(service=svc)} {self._duration_sum[svc]:.6f}")
                    lines.append(f"{name}_count{_labels(service=svc)} {count}")
            elif family.name == "active_backends":
                for svc, n in sorted(active_backends.items()):
                    lines.append(f"{name}{_labels(service=svc)} {n}")
            elif family.name == "spawn_attempts":
                for (svc, ver, outcome), n in sorted(self.spawn_attempts.items()):
                    lines.append(f"{name}{_labels(service=svc, version=ver, outcome=outcome)} {n}")
            elif family.name == "spawn_budget_remaining":
                for (svc, ver), n in sorted(budget_remaining.items()):
                    lines.append(f"{name}{_labels(service=svc, version=ver)} {n}")
            elif family.name == "connections_open":
                lines.append(f"{name} {connections_open}")
            elif family.name == "fd_usage_ratio":
                lines.append(f"{name} {fd_usage_ratio:.6f}")
            else:
                lines.append(f"{name} {int(uptime_seconds)}")
        # rpbroker's own families (not frozen v1 names), after the frozen ones.
        for family, counter, label in (
            (_HANDOFF_PLANS, self.handoff_plans, "plan"),
            (_HANDOFF_RESULTS, self.handoff_results, "result"),
        ):
            lines.extend(_family_header(family))
            for value, n in sorted(counter.items()):
                lines.append(f"{family.sample_name}{_labels(**{label: value})} {n}")
        lines.extend(_family_header(_CONNECTION_ERRORS))
        lines.append(f"{_CONNECTION_ERRORS.sample_name} {self.connection_errors}")
        lines.append("# EOF")
        return "\n".join(lines) + "\n"
