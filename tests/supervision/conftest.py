"""Shared helpers for the MockClock supervision tests.

Every test here runs on ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture, requested by each test), over in-process fake backends
from ``rpbroker.testing``: no real process is started, so virtual time is the only
time that matters and ``trio.current_time()`` differences are exact.
"""

from __future__ import annotations

from typing import Any

import pytest

from rpbroker.client import forget_cached_endpoints
from rpbroker.testing.pytest_plugin import rpbroker_test_broker, rpbroker_test_broker_factory

__all__ = ["exactly", "rpbroker_test_broker", "rpbroker_test_broker_factory"]

#: Tolerance for "exact" virtual-time comparisons: MockClock time is a float sum.
EXACT_S = 1e-6

#: Outer bound (virtual seconds) for every test body.
LIMIT_S = 600.0


def exactly(seconds: float) -> Any:
    """``pytest.approx`` with an absolute tolerance of a microsecond."""
    return pytest.approx(seconds, abs=EXACT_S)


@pytest.fixture(autouse=True)
def _fresh_endpoint_cache() -> None:
    # The client's Hello-skip cache is process-wide; start each test without it.
    forget_cached_endpoints()
