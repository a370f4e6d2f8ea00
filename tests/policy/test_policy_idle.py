"""Idle tracking (facts §7)."""

from __future__ import annotations

from rpbroker.policy.broadcast import QuiesceReason
from rpbroker.policy.idle import DEFAULT_IDLE_TIMEOUT_S, BackendLifecycle, IdleDue, IdleTracker


def test_default_idle_timeout_is_thirty_seconds() -> None:
    assert DEFAULT_IDLE_TIMEOUT_S == 30.0
    tracker = IdleTracker()
    assert tracker.default_timeout_s == 30.0
    tracker.mark_activity("a", 0.0)
    assert tracker.timeout_of("a") == 30.0


def test_zero_timeout_clamps() -> None:
    assert IdleTracker(0.0).default_timeout_s == 0.001
    tracker = IdleTracker()
    tracker.mark_activity("a", 0.0, timeout_s=-1.0)
    assert tracker.timeout_of("a") == 0.001


def test_active_backend_is_not_due_before_timeout() -> None:
    tracker = IdleTracker(10.0)
    tracker.mark_activity("a", 0.0)
    assert tracker.collect_due(9.999) == []
    assert tracker.state("a") is BackendLifecycle.RUNNING


def test_idle_backend_is_due_at_timeout() -> None:
    tracker = IdleTracker(10.0)
    tracker.mark_activity("a", 0.0)
    due = tracker.collect_due(10.0)
    assert due == [IdleDue("a", 10.0, 10.0)]
    assert due[0].reason is QuiesceReason.IDLE_TIMEOUT
    assert tracker.state("a") is BackendLifecycle.DRAINING


def test_mark_activity_resets_idle_deadline() -> None:
    tracker = IdleTracker(10.0)
    tracker.mark_activity("a", 0.0)
    tracker.mark_activity("a", 5.0)
    assert tracker.collect_due(10.0) == []
    assert tracker.next_due_at() == 15.0
    assert tracker.collect_due(15.0) == [IdleDue("a", 10.0, 10.0)]


def test_due_reports_actual_idle_time() -> None:
    tracker = IdleTracker(10.0)
    tracker.mark_activity("a", 0.0)
    assert tracker.collect_due(25.0) == [IdleDue("a", 25.0, 10.0)]


def test_draining_and_quiesced_backends_are_not_repeatedly_emitted() -> None:
    tracker = IdleTracker(1.0)
    tracker.mark_activity("a", 0.0)
    tracker.mark_activity("b", 0.0)
    assert len(tracker.collect_due(2.0)) == 2
    assert tracker.collect_due(3.0) == []
    assert tracker.mark_quiesced("a")
    assert tracker.collect_due(100.0) == []
    assert tracker.state("a") is BackendLifecycle.QUIESCED
    assert tracker.state("b") is BackendLifecycle.DRAINING
    assert tracker.next_due_at() is None


def test_activity_revives_draining_and_quiesced() -> None:
    tracker = IdleTracker(1.0)
    tracker.mark_activity("a", 0.0)
    tracker.collect_due(1.0)
    tracker.mark_quiesced("a")
    tracker.mark_activity("a", 5.0)
    assert tracker.state("a") is BackendLifecycle.RUNNING
    assert tracker.next_due_at() == 6.0
    assert tracker.collect_due(6.0) == [IdleDue("a", 1.0, 1.0)]


def test_externally_drained_backend_is_not_emitted() -> None:
    tracker = IdleTracker(1.0)
    tracker.mark_activity("a", 0.0)
    assert tracker.mark_draining("a")
    assert tracker.collect_due(5.0) == []
    assert tracker.next_due_at() is None
    tracker.mark_activity("a", 6.0)
    assert tracker.next_due_at() == 7.0


def test_multiple_backend_keys_have_independent_deadlines() -> None:
    tracker = IdleTracker(10.0)
    tracker.mark_activity("a", 0.0)
    tracker.mark_activity("b", 0.0, timeout_s=5.0)
    tracker.mark_activity("c", 3.0)
    assert tracker.next_due_at() == 5.0
    assert [d.key for d in tracker.collect_due(5.0)] == ["b"]
    assert tracker.next_due_at() == 10.0
    assert [d.key for d in tracker.collect_due(13.0)] == ["a", "c"]
    assert tracker.next_due_at() is None


def test_per_backend_timeout_is_kept_on_later_activity() -> None:
    tracker = IdleTracker(30.0)
    tracker.mark_activity("a", 0.0, timeout_s=5.0)
    tracker.mark_activity("a", 1.0)
    assert tracker.timeout_of("a") == 5.0
    assert tracker.next_due_at() == 6.0


def test_shortening_the_timeout_moves_the_due_time_earlier() -> None:
    tracker = IdleTracker(30.0)
    tracker.mark_activity("a", 0.0)
    tracker.mark_activity("a", 1.0, timeout_s=2.0)
    assert tracker.next_due_at() == 3.0
    assert tracker.collect_due(3.0) == [IdleDue("a", 2.0, 2.0)]


def test_remove_backend_drops_idle_tracking() -> None:
    tracker = IdleTracker(1.0)
    tracker.mark_activity("a", 0.0)
    assert tracker.remove("a") is True
    assert tracker.remove("a") is False
    assert "a" not in tracker
    assert tracker.collect_due(10.0) == []
    assert tracker.next_due_at() is None
    assert tracker.state("a") is None
    assert tracker.last_active("a") is None


def test_unknown_keys() -> None:
    tracker = IdleTracker()
    assert tracker.mark_draining("x") is False
    assert tracker.mark_quiesced("x") is False
    assert tracker.state("x") is None
    assert tracker.timeout_of("x") is None


def test_last_active_and_keys() -> None:
    tracker = IdleTracker()
    tracker.mark_activity("a", 1.0)
    tracker.mark_activity("b", 2.0)
    tracker.mark_activity("a", 3.0)
    assert tracker.last_active("a") == 3.0
    assert tracker.keys() == ["a", "b"]
    assert len(tracker) == 2


def test_frequent_activity_does_not_grow_the_heap() -> None:
    tracker = IdleTracker(10.0)
    for i in range(10_000):
        tracker.mark_activity("a", i * 0.001)
    assert len(tracker._heap) == 1
    assert tracker.next_due_at() == 9.999 + 10.0


def test_float_rounding_cannot_stall_the_sweep() -> None:
    tracker = IdleTracker(0.2)
    tracker.mark_activity("a", 0.1)
    # 0.1 + 0.2 is 0.30000000000000004, so at 0.3 the backend is not yet due.
    assert tracker.collect_due(0.3) == []
    assert len(tracker.collect_due(0.30000000000000004)) == 1
