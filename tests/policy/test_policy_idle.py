"""Idle tracking (facts §7): due once, removed when handed out, next due time."""

from __future__ import annotations

import pytest

from rpbroker.policy.idle import DEFAULT_IDLE_TIMEOUT_S, IdleDue, IdleTracker


def test_default_idle_timeout_is_thirty_seconds() -> None:
    assert DEFAULT_IDLE_TIMEOUT_S == 30.0
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0)
    assert tracker.next_due_at() == 30.0
    assert tracker.collect_due(29.999) == []
    assert tracker.collect_due(30.0) == [IdleDue("a", 30.0, 30.0)]


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan")])
def test_non_positive_timeout_clamps_to_one_millisecond(timeout_s: float) -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=timeout_s)
    assert tracker.next_due_at() == 0.001
    assert tracker.collect_due(0.001) == [IdleDue("a", 0.001, 0.001)]


def test_active_backend_is_not_due_before_timeout() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=10.0)
    assert tracker.collect_due(9.999) == []
    assert "a" in tracker


def test_idle_backend_is_due_at_timeout_and_stops_being_tracked() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=10.0)
    assert tracker.collect_due(10.0) == [IdleDue("a", 10.0, 10.0)]
    assert "a" not in tracker
    assert len(tracker) == 0
    assert tracker.next_due_at() is None


def test_mark_activity_resets_idle_deadline() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=10.0)
    tracker.mark_activity("a", 5.0, timeout_s=10.0)
    assert tracker.collect_due(10.0) == []
    assert tracker.next_due_at() == 15.0
    assert tracker.collect_due(15.0) == [IdleDue("a", 10.0, 10.0)]


def test_due_reports_actual_idle_time() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=10.0)
    assert tracker.collect_due(25.0) == [IdleDue("a", 25.0, 10.0)]


def test_collected_backends_are_not_emitted_again() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=1.0)
    tracker.mark_activity("b", 0.0, timeout_s=1.0)
    assert len(tracker.collect_due(2.0)) == 2
    assert tracker.collect_due(3.0) == []
    assert tracker.collect_due(100.0) == []
    assert tracker.next_due_at() is None
    assert len(tracker) == 0


def test_activity_after_collection_tracks_it_again() -> None:
    # The caller found it busy after all (or it is routable again): track it anew.
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=1.0)
    tracker.collect_due(1.0)
    tracker.mark_activity("a", 5.0, timeout_s=1.0)
    assert "a" in tracker
    assert tracker.next_due_at() == 6.0
    assert tracker.collect_due(6.0) == [IdleDue("a", 1.0, 1.0)]


def test_multiple_backend_keys_have_independent_deadlines() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=10.0)
    tracker.mark_activity("b", 0.0, timeout_s=5.0)
    tracker.mark_activity("c", 3.0, timeout_s=10.0)
    assert tracker.next_due_at() == 5.0
    assert [d.key for d in tracker.collect_due(5.0)] == ["b"]
    assert tracker.next_due_at() == 10.0
    assert [d.key for d in tracker.collect_due(13.0)] == ["a", "c"]
    assert tracker.next_due_at() is None


def test_collect_due_returns_earliest_due_first() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("late", 2.0, timeout_s=1.0)
    tracker.mark_activity("early", 0.0, timeout_s=1.0)
    tracker.mark_activity("middle", 0.0, timeout_s=2.0)
    tracker.mark_activity("late", 2.5, timeout_s=1.0)  # re-filed lazily, still in order
    assert [d.key for d in tracker.collect_due(10.0)] == ["early", "middle", "late"]


def test_each_activity_sets_the_timeout_it_is_given() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=5.0)
    tracker.mark_activity("a", 1.0)  # no timeout given: the default
    assert tracker.next_due_at() == 1.0 + DEFAULT_IDLE_TIMEOUT_S
    assert tracker.collect_due(6.0) == []
    assert tracker.collect_due(31.0) == [IdleDue("a", 30.0, 30.0)]


def test_shortening_the_timeout_moves_the_due_time_earlier() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=30.0)
    tracker.mark_activity("a", 1.0, timeout_s=2.0)
    assert tracker.next_due_at() == 3.0
    assert tracker.collect_due(3.0) == [IdleDue("a", 2.0, 2.0)]
    assert tracker.collect_due(100.0) == []  # the superseded heap entry is stale


def test_lengthening_the_timeout_moves_the_due_time_later() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=2.0)
    tracker.mark_activity("a", 1.0, timeout_s=30.0)
    assert tracker.collect_due(3.0) == []
    assert tracker.next_due_at() == 31.0


def test_remove_backend_drops_idle_tracking() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=1.0)
    assert tracker.remove("a") is True
    assert tracker.remove("a") is False
    assert "a" not in tracker
    assert tracker.collect_due(10.0) == []
    assert tracker.next_due_at() is None


def test_removed_then_tracked_again_is_due_once_at_its_new_time() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.0, timeout_s=1.0)
    tracker.remove("a")
    tracker.mark_activity("a", 5.0, timeout_s=1.0)
    assert tracker.collect_due(4.0) == []  # the old heap entry does not resurrect it early
    assert tracker.next_due_at() == 6.0
    assert tracker.collect_due(6.0) == [IdleDue("a", 1.0, 1.0)]
    assert tracker.collect_due(7.0) == []


def test_unknown_keys() -> None:
    tracker = IdleTracker[str]()
    assert tracker.remove("x") is False
    assert "x" not in tracker
    assert len(tracker) == 0


def test_len_counts_tracked_backends() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 1.0)
    tracker.mark_activity("b", 2.0)
    tracker.mark_activity("a", 3.0)
    assert len(tracker) == 2


def test_frequent_activity_does_not_grow_the_heap() -> None:
    tracker = IdleTracker[str]()
    for i in range(10_000):
        tracker.mark_activity("a", i * 0.001, timeout_s=10.0)
    assert len(tracker._heap) == 1
    assert tracker.next_due_at() == 9.999 + 10.0


def test_tracking_churn_does_not_grow_the_heap() -> None:
    tracker = IdleTracker[int]()
    for i in range(10_000):
        tracker.mark_activity(i, float(i))
        tracker.remove(i)
    assert len(tracker) == 0
    assert len(tracker._heap) <= 64 + 1


def test_float_rounding_cannot_stall_the_sweep() -> None:
    tracker = IdleTracker[str]()
    tracker.mark_activity("a", 0.1, timeout_s=0.2)
    # 0.1 + 0.2 is 0.30000000000000004, so at 0.3 the backend is not yet due.
    assert tracker.collect_due(0.3) == []
    assert len(tracker.collect_due(0.30000000000000004)) == 1
