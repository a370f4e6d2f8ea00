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
)
from rpbroker.policy.tokens import TokenStore

ZCCACHE = BackendRef("zccache", 0)


def make(deadline_s: float = DEFAULT_ACK_DEADLINE_S) -> tuple[TokenStore, AckRegistry]:
    tokens = TokenStore()
    return tokens, AckRegistry(tokens, deadline_s=deadline_s)


def test_default_deadline_is_five_seconds() -> None:
    assert DEFAULT_ACK_DEADLINE_S == 5.0
    tokens, registry = make()
    assert registry.register(tokens.issue(10.0), ZCCACHE, 10.0) == 15.0


@pytest.mark.parametrize("deadline_s", [0.0, -1.0, float("nan")])
def test_non_positive_deadline_clamps_to_one_millisecond(deadline_s: float) -> None:
    tokens, registry = make(deadline_s)
    token = tokens.issue(0.0)
    assert registry.register(token, ZCCACHE, 0.0) == 0.001
    outcome = registry.acknowledge(token, 0.001)
    assert outcome == AckRejected(AckRejection.DEADLINE_EXCEEDED, ZCCACHE, 0.001)


def test_register_records_backend_and_deadline() -> None:
    tokens, registry = make()
    token = tokens.issue(10.0)
    backend = BackendRef("zccache", 4242)
    assert registry.register(token, backend, 10.0) == 15.0
    assert len(registry) == 1
    outcome = registry.acknowledge(token, 14.5)
    assert outcome == AckCompleted(token, backend, 4.5)


def test_ack_before_deadline_completes_and_rejects_duplicate_ack() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    outcome = registry.acknowledge(token, 1.25)
    assert outcome == AckCompleted(token, ZCCACHE, 1.25)
    assert isinstance(outcome, AckCompleted) and outcome.waited_s < 5.0
    assert len(registry) == 0
    assert len(tokens) == 0
    again = registry.acknowledge(token, 1.3)
    assert again == AckRejected(AckRejection.NOT_PENDING)
    assert again.backend is None and again.deadline_s is None


def test_completed_token_is_revoked_from_the_store() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    registry.acknowledge(token, 0.1)
    assert tokens.revoke(token) is False  # no longer held: it cannot be adopted later


def test_late_ack_reports_deadline_exceeded_and_revokes() -> None:
    tokens, registry = make(0.005)
    token = tokens.issue(0.0)
    backend = BackendRef("zccache", 4242)
    registry.register(token, backend, 0.0)
    outcome = registry.acknowledge(token, 0.050)
    assert outcome == AckRejected(AckRejection.DEADLINE_EXCEEDED, backend, 0.005)
    assert len(registry) == 0
    assert len(tokens) == 0
    assert registry.acknowledge(token, 0.060) == AckRejected(AckRejection.NOT_PENDING)


def test_ack_exactly_at_deadline_is_late() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    outcome = registry.acknowledge(token, 1.0)
    assert isinstance(outcome, AckRejected)
    assert outcome.reason is AckRejection.DEADLINE_EXCEEDED


def test_ack_just_before_deadline_completes() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert isinstance(registry.acknowledge(token, 0.999), AckCompleted)


def test_rejection_values_match_reference() -> None:
    assert [r.value for r in AckRejection] == ["not_pending", "deadline_exceeded"]


def test_abandon_removes_entry_and_revokes() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert registry.abandon(token) is True
    assert len(registry) == 0
    assert len(tokens) == 0
    assert registry.acknowledge(token, 0.1) == AckRejected(AckRejection.NOT_PENDING)


def test_overdue_entry_stays_until_its_attempt_abandons_it() -> None:
    # No sweep: the shell's wait ends at the deadline and abandons its own entry.
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    tokens.issue(3.0)  # time passes; nothing expires the entry by itself
    assert len(registry) == 1
    assert registry.abandon(token) is True
    assert len(registry) == 0
    assert len(tokens) == 1  # only the other token is left


def test_abandon_with_nothing_pending_still_revokes_token() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)  # issued but never registered
    assert registry.abandon(token) is False
    assert len(tokens) == 0
    assert tokens.revoke(token) is False


def test_abandon_twice() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert registry.abandon(token) is True
    assert registry.abandon(token) is False


def test_abandon_after_a_late_ack_reports_nothing_pending() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, ZCCACHE, 0.0)
    assert isinstance(registry.acknowledge(token, 2.0), AckRejected)
    assert registry.abandon(token) is False


def test_reregistering_same_token_replaces_entry() -> None:
    tokens, registry = make(1.0)
    token = tokens.issue(0.0)
    registry.register(token, BackendRef("a", 1), 0.0)
    assert registry.register(token, BackendRef("b", 2), 5.0) == 6.0
    assert len(registry) == 1
    # The first registration's deadline (1.0) and backend no longer apply.
    outcome = registry.acknowledge(token, 5.5)
    assert outcome == AckCompleted(token, BackendRef("b", 2), 0.5)


def test_entries_are_independent() -> None:
    tokens, registry = make(1.0)
    late = tokens.issue(0.0)
    early = tokens.issue(0.0)
    registry.register(late, BackendRef("late"), 2.0)
    registry.register(early, BackendRef("early"), 1.0)
    assert isinstance(registry.acknowledge(early, 2.5), AckRejected)
    assert registry.acknowledge(late, 2.5) == AckCompleted(late, BackendRef("late"), 0.5)


def test_empty_registry() -> None:
    tokens, registry = make()
    assert len(registry) == 0
    assert registry.acknowledge(tokens.issue(0.0), 1e9) == AckRejected(AckRejection.NOT_PENDING)


def test_ack_of_unregistered_token_does_not_revoke_it() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    assert registry.acknowledge(token, 0.0) == AckRejected(AckRejection.NOT_PENDING)
    assert len(tokens) == 1
    assert tokens.revoke(token) is True


@pytest.mark.parametrize("n", [1_000, 20_000])
def test_nothing_accumulates_under_churn(n: int) -> None:
    tokens = TokenStore(max_pending=n + 1)
    registry = AckRegistry(tokens)
    for i in range(n):
        token = tokens.issue(float(i))
        registry.register(token, ZCCACHE, float(i))
        if i % 2:
            assert isinstance(registry.acknowledge(token, float(i)), AckCompleted)
        else:
            assert registry.abandon(token)
    assert len(registry) == 0
    assert len(tokens) == 0


def test_hello_time_registration_knows_only_the_service() -> None:
    tokens, registry = make()
    token = tokens.issue(0.0)
    registry.register(token, BackendRef("zccache"), 0.0)
    assert len(registry) == 1
    outcome = registry.acknowledge(token, 0.1)
    assert isinstance(outcome, AckCompleted)
    assert outcome.backend == BackendRef("zccache", 0)


def test_expired_handoff_does_not_poison_later_handoffs_for_the_backend() -> None:
    tokens, registry = make(1.0)
    first = tokens.issue(0.0)
    registry.register(first, ZCCACHE, 0.0)
    assert registry.abandon(first)  # its wait ran out
    second = tokens.issue(5.0)
    registry.register(second, ZCCACHE, 5.0)
    assert isinstance(registry.acknowledge(second, 5.5), AckCompleted)
