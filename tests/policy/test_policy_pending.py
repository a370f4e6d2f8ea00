"""Pending handoff queue (facts §3.10, tests listed in §2)."""

from __future__ import annotations

from rpbroker.policy.fallback import Fallback, FallbackReason
from rpbroker.policy.pending import (
    DEFAULT_MAX_PENDING_HANDOFFS,
    DEFAULT_PENDING_HANDOFF_TTL_S,
    PendingHandoffQueue,
    PendingOverflow,
)


def test_defaults_and_clamping() -> None:
    assert (DEFAULT_MAX_PENDING_HANDOFFS, DEFAULT_PENDING_HANDOFF_TTL_S) == (64, 0.1)
    queue: PendingHandoffQueue[int] = PendingHandoffQueue(0, 0.0)
    assert (queue.max_pending, queue.ttl_s) == (1, 0.001)


def test_hundred_simulated_handoffs_cannot_grow_backlog_without_bound() -> None:
    queue: PendingHandoffQueue[int] = PendingHandoffQueue(max_pending=8, ttl_s=10.0)
    overflows = 0
    for i in range(100):
        if queue.enqueue(i, 0.0) is not None:
            overflows += 1
        assert len(queue) <= 8
    assert overflows == 92


def test_overflow_is_a_silent_fd_pressure_fallback() -> None:
    queue: PendingHandoffQueue[str] = PendingHandoffQueue(max_pending=1)
    assert queue.enqueue("a", 0.0) is None
    overflow = queue.enqueue("b", 0.0)
    assert overflow == PendingOverflow(1)
    assert overflow.fallback() == Fallback(FallbackReason.FD_PRESSURE_DISABLED)
    assert overflow.fallback().uses_backend_reconnect
    assert not overflow.fallback().sends_client_error


def test_pending_handoffs_dequeue_in_fifo_order_after_overflow() -> None:
    queue: PendingHandoffQueue[int] = PendingHandoffQueue(max_pending=3, ttl_s=10.0)
    for i in range(5):
        queue.enqueue(i, 0.0)
    assert [queue.dequeue(1.0) for _ in range(4)] == [0, 1, 2, None]


def test_expired_pending_handoffs_free_capacity_without_client_error() -> None:
    queue: PendingHandoffQueue[int] = PendingHandoffQueue(max_pending=2, ttl_s=0.1)
    queue.enqueue(1, 0.0)
    queue.enqueue(2, 0.05)
    assert queue.enqueue(3, 0.05) is not None
    assert queue.expire(0.1) == [1]  # expired exactly at enqueued + ttl
    assert queue.enqueue(3, 0.1) is None
    assert queue.dequeue(0.16) == 3  # 2 expired at 0.15 and was dropped
    assert len(queue) == 0
