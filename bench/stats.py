"""Summary statistics for benchmark samples.

What this does: nearest-rank percentiles (facts §3.11) and the P50/P99 summary in
microseconds that every latency row of the report uses, plus a guarded ratio.

What it does not do: decide whether a number is good (``bench.targets`` does), or
smooth anything: a percentile is one of the samples.
"""

from __future__ import annotations

#: Nanoseconds per microsecond.
NS_PER_US = 1000


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile: the sample at index ceil(n*p/100) - 1 of the sorted list."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    """P50 and P99 in microseconds (one decimal) and the sample count."""
    values = [float(s) for s in samples_ns]
    return {
        "p50_us": round(percentile(values, 50) / NS_PER_US, 1),
        "p99_us": round(percentile(values, 99) / NS_PER_US, 1),
        "n": len(values),
    }


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` to three decimals (infinity for a zero denominator)."""
    if denominator == 0:
        return float("inf")
    return round(numerator / denominator, 3)
