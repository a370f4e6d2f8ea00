"""Pending-ACK registry: deadlines, exactly-once exits, token revocation (seed 001)."""

from __future__ import annotations

import pytest

from rpbroker.policy.ack import (
    DEFAULT_ACK_DEADLINE_S,
    AckCompleted,
    AckRegistry,
    AckRejected,
    AckRejection,
    BackendRef,
    ExpiredHandoff,
)
from rpbroker.policy.fallback import Fallback, FallbackReason
from rpbroker.policy.tokens import TokenStore, TokenVerdict

ZCCACHE = BackendRef("zccache", 0)


def make(deadline_s: float = DEFAULT_ACK_DEADLINE_S) -> tuple[TokenStore, AckRegistry]:
    tokens = TokenStore()
    return tokens, AckRegistry(tokens, deadline_s=deadline_s)


def test_default_deadline_is_five_seconds() -> None:
    assert DEFAULT_ACK_DEADLINE_S == 5.0
    _, registry = make()
    assert registry.deadline_s == 5.0


def test_zero_deadline_clamps_to_one_millisecond() -> None:
    _, registry = make(0.0)
    assert registry.deadline_s == 0.001
    _, negative = make(-1.0)
    assert negative.deadline_s == 0.001


def test_register_records_backend_and_deadline() -> None:
    tokens, registry = make()
    token = tokens.issue(10.0)
    assert registry.register(token, ZCCACHE, 10.0) == 15.0
    assert len(registry) == 1
    assert token in registry
    assert registry.backend_of(token) == BackendRef("zccache", 0)
    assert registry.deadline_of(token) == 15.0
    assert registry.next_deadline() == 15.0


def test_register_with_override_deadline() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    assert registry.register(token, ZCCACHE, 0.0, deadline_s=0.5) == 0.5
    other = tokens.issue(0.0)
    assert registry.register(other, ZCCACHE, 0.0, deadline_s=0.0) == 0.001


def test_ack_before_deadline_completes_and_rejects_duplicate_ack() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    outcome = registry.acknowledge(token, 1.25)
    assert outcome == AckCompleted(token, ZCCACHE, 1.25)
    assert isinstance(outcome, AckCompleted) and outcome.waited_s < 5.0
    assert len(registry) == 0
    assert tokens.pending_count == 0
    again = registry.acknowledge(token, 1.3)
    assert again == AckRejected(AckRejection.NOT_PENDING)
    assert again.backend is None and again.deadline_s is None


def test_completed_token_cannot_be_adopted_by_backend() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    registry.acknowledge(token, 0.1)
    assert tokens.consume(token, 0.2) is TokenVerdict.NOT_PENDING


def test_missed_deadline_expires_with_backend_ack_timeout_and_revokes_token() -> None:
    tokens, registry = make(0.010)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    expired = registry.expire_overdue(1.0)
    assert expired == [ExpiredHandoff(token, ZCCACHE, 0.010)]
    assert expired[0].reason is FallbackReason.BACKEND_ACK_TIMEOUT
    assert expired[0].fallback() == Fallback(FallbackReason.BACKEND_ACK_TIMEOUT)
    assert registry.acknowledge(token, 1.0) == AckRejected(AckRejection.NOT_PENDING)
    assert tokens.consume_matching(token, token, 1.0) is TokenVerdict.NOT_PENDING


def test_late_ack_without_sweep_reports_deadline_exceeded() -> None:
    tokens, registry = make(0.005)
    token = tokens.issue(0.0)
    backend = BackendRef("zccache", 4242)
    registry.register(token, backend, 0.0)
    outcome = registry.acknowledge(token, 0.050)
    assert outcome == AckRejected(AckRejection.DEADLINE_EXCEEDED, backend, 0.005)
    assert isinstance(outcome, AckRejected)
    assert outcome.deadline == 0.005
    assert outcome.fallback_reason is FallbackReason.BACKEND_ACK_TIMEOUT
    assert len(registry) == 0
    assert tokens.pending_count == 0
    assert registry.expire_overdue(1.0) == []


def test_ack_exactly_at_deadline_is_late() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    outcome = registry.acknowledge(token, 1.0)
    assert isinstance(outcome, AckRejected)
    assert outcome.reason is AckRejection.DEADLINE_EXCEEDED


def test_not_pending_rejection_has_no_fallback_reason() -> None:
    assert AckRejected(AckRejection.NOT_PENDING).fallback_reason is None


def test_abandon_removes_entry_and_revokes() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert registry.abandon(token) is True
    assert len(registry) == 0
    assert tokens.pending_count == 0
    assert registry.acknowledge(token, 0.1) == AckRejected(AckRejection.NOT_PENDING)


def test_abandon_with_nothing_pending_still_revokes_token() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)  # issued but never registered
    assert registry.abandon(token) is False
    assert tokens.pending_count == 0
    assert tokens.consume(token, 0.0) is TokenVerdict.NOT_PENDING


def test_abandon_after_expiry_reports_nothing_pending() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert len(registry.expire_overdue(2.0)) == 1
    assert registry.abandon(token) is False
    assert tokens.pending_count == 0


def test_abandon_twice() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert registry.abandon(token) is True
    assert registry.abandon(token) is False


def test_reregistering_same_token_replaces_entry() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, BackendRef("a", 1), 0.0)
    registry.register(token, BackendRef("b", 2), 5.0)
    assert len(registry) == 1
    assert registry.backend_of(token) == BackendRef("b", 2)
    # The first registration's deadline (1.0) no longer applies.
    assert registry.expire_overdue(3.0) == []
    assert registry.next_deadline() == 6.0
    outcome = registry.acknowledge(token, 5.5)
    assert isinstance(outcome, AckCompleted)
    assert outcome.waited_s == 0.5


def test_expire_overdue_only_takes_overdue_entries_in_deadline_order() -> None:
    tokens, registry = make()
    late = tokens.issue(0.0)
    early = tokens.issue(0.0)
    fresh = tokens.issue(0.0)
    registry.register(late, BackendRef("late"), 2.0)
    registry.register(early, BackendRef("early"), 1.0)
    registry.register(fresh, BackendRef("fresh"), 10.0)
    assert registry.expire_overdue(5.999) == []
    expired = registry.expire_overdue(7.0)
    assert [e.backend.service_name for e in expired] == ["early", "late"]
    assert len(registry) == 1
    assert fresh in registry
    assert tokens.is_pending(fresh, 7.0)
    assert registry.next_deadline() == 15.0


def test_expiry_exactly_at_deadline() -> None:
    tokens, registry = make(2.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert registry.expire_overdue(1.999) == []
    assert len(registry.expire_overdue(2.0)) == 1


def test_next_deadline_skips_completed_entries() -> None:
    tokens, registry = make(1.0)
    first = tokens.issue(0.0)
    second = tokens.issue(0.0)
    registry.register(first, ZCCACHE, 0.0)
    registry.register(second, ZCCACHE, 0.5)
    registry.acknowledge(first, 0.6)
    assert registry.next_deadline() == 1.5
    registry.abandon(second)
    assert registry.next_deadline() is None


def test_empty_registry() -> None:
    _, registry = make()
    assert len(registry) == 0
    assert registry.next_deadline() is None
    assert registry.expire_overdue(1e9) == []
    assert registry.deadline_of(TokenStore().issue(0.0)) is None


def test_ack_of_unregistered_token_does_not_revoke_it() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    assert registry.acknowledge(token, 0.0) == AckRejected(AckRejection.NOT_PENDING)
    assert tokens.is_pending(token, 0.0)


@pytest.mark.parametrize("n", [1_000, 20_000])
def test_heap_garbage_stays_bounded_under_churn(n: int) -> None:
    tokens = TokenStore(max_pending=n + 1)
    registry = AckRegistry(tokens)
    for i in range(n):
        token = tokens.issue(float(i))
        registry.register(token, ZCCACHE, float(i))
        registry.acknowledge(token, float(i))
    assert len(registry) == 0
    assert len(registry._heap) <= 64 + 1


def test_hello_time_registration_knows_only_the_service() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, BackendRef("zccache"), 0.0)
    assert len(registry) == 1
    assert registry.backend_of(token) == BackendRef("zccache", 0)


def test_expired_handoff_does_not_poison_later_handoffs_for_the_backend() -> None:
    tokens, registry = make(1.0)
    first = tokens.issue(0.0)
    registry.register(first, ZCCACHE, 0.0)
    assert len(registry.expire_overdue(5.0)) == 1
    second = tokens.issue(5.0)
    registry.register(second, ZCCACHE, 5.0)
    assert isinstance(registry.acknowledge(second, 5.5), AckCompleted)
