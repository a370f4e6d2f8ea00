"""Handoff tokens: issue, consume exactly once, expiry, capacity, parsing (facts §1)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from rpbroker.policy.tokens import (
    DEFAULT_COLLISION_ATTEMPTS,
    DEFAULT_MAX_PENDING_TOKENS,
    DEFAULT_TOKEN_TTL_S,
    HANDOFF_TOKEN_BYTES,
    HandoffToken,
    TokenCollisionExhausted,
    TokenRejection,
    TokenStore,
    TokenStoreError,
    TokenStoreFull,
    TokenVerdict,
    parse_token,
)


def counting_source() -> Callable[[int], bytes]:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def tok(i: int) -> HandoffToken:
    return HandoffToken(i.to_bytes(HANDOFF_TOKEN_BYTES, "big"))


def test_defaults_match_reference() -> None:
    assert HANDOFF_TOKEN_BYTES == 16
    assert DEFAULT_TOKEN_TTL_S == 30.0
    assert DEFAULT_MAX_PENDING_TOKENS == 1024
    assert DEFAULT_COLLISION_ATTEMPTS == 16
    store = TokenStore()
    assert (store.max_pending, store.ttl_s, store.collision_attempts) == (1024, 30.0, 16)


def test_generated_token_is_128_bits() -> None:
    token = TokenStore().issue(0.0)
    assert len(token.raw) == 16
    assert len(HandoffToken.generate().raw) == 16
    assert bytes(token) == token.raw


def test_token_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        HandoffToken(b"short")


def test_token_repr_is_redacted() -> None:
    token = HandoffToken(b"\xab" * 16)
    assert repr(token) == "HandoffToken(<redacted>)"
    assert "ab" not in str(token)


def test_token_equality_and_hash() -> None:
    a = HandoffToken(b"x" * 16)
    b = HandoffToken(bytearray(b"x" * 16))
    c = HandoffToken(b"y" * 16)
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert {a: 1}[b] == 1
    assert a != b"x" * 16


def test_each_issue_is_distinct() -> None:
    store = TokenStore()
    tokens = {store.issue(0.0) for _ in range(50)}
    assert len(tokens) == 50
    assert store.pending_count == 50


def test_token_mismatch_does_not_consume_pending_token() -> None:
    store = TokenStore(random_source=counting_source())
    token = store.issue(0.0)
    assert store.consume_matching(token, tok(999), 1.0) is TokenVerdict.MISMATCH
    assert store.pending_count == 1
    assert store.consume_matching(token, token, 1.0) is TokenVerdict.ACCEPTED
    assert store.consume_matching(token, token, 1.0) is TokenVerdict.NOT_PENDING


def test_accepts_valid_payload_and_consumes_token_once() -> None:
    store = TokenStore()
    token = store.issue(0.0)
    assert store.consume_matching(token, token.raw, 0.5) is TokenVerdict.ACCEPTED
    assert store.pending_count == 0
    assert store.consume_matching(token, token.raw, 0.6) is TokenVerdict.NOT_PENDING


def test_malformed_token_bytes_reject_without_consuming_pending_token() -> None:
    store = TokenStore()
    token = store.issue(0.0)
    assert store.consume_matching(token, b"", 0.1) is TokenVerdict.MISSING
    assert store.consume_matching(token, b"\x00" * 15, 0.1) is TokenVerdict.BAD_LENGTH
    assert store.consume_matching(token, b"\x00" * 17, 0.1) is TokenVerdict.BAD_LENGTH
    assert store.pending_count == 1
    assert store.consume_matching(token, token.raw, 0.2) is TokenVerdict.ACCEPTED


def test_expired_token_rejects_and_removes_pending_token() -> None:
    store = TokenStore(ttl_s=0.005)
    token = store.issue(0.0)
    assert store.consume_matching(token, token, 0.006) is TokenVerdict.EXPIRED
    assert store.pending_count == 0
    assert store.consume_matching(token, token, 0.006) is TokenVerdict.NOT_PENDING
    store.issue(0.006)
    assert store.pending_count == 1


def test_expired_exactly_at_ttl_boundary() -> None:
    store = TokenStore(ttl_s=10.0)
    token = store.issue(5.0)
    assert store.is_pending(token, 14.999)
    assert not store.is_pending(token, 15.0)
    assert store.consume_matching(token, token, 15.0) is TokenVerdict.EXPIRED


def test_consume_matching_keeps_expected_through_prune_to_report_expired() -> None:
    store = TokenStore(ttl_s=1.0, random_source=counting_source())
    token = store.issue(0.0)
    other = store.issue(0.0)
    # Both are expired at t=2; the other is pruned, the expected reported EXPIRED.
    assert store.consume_matching(token, token, 2.0) is TokenVerdict.EXPIRED
    assert store.pending_count == 0
    assert store.consume_matching(other, other, 2.0) is TokenVerdict.NOT_PENDING


def test_mismatch_on_expired_expected_reports_expired() -> None:
    store = TokenStore(ttl_s=1.0)
    token = store.issue(0.0)
    assert store.consume_matching(token, tok(1), 1.5) is TokenVerdict.EXPIRED


def test_pending_tokens_are_capacity_bounded_until_consumed() -> None:
    store = TokenStore(max_pending=1)
    token = store.issue(0.0)
    with pytest.raises(TokenStoreFull) as info:
        store.issue(0.0)
    assert info.value.max_pending == 1
    assert isinstance(info.value, TokenStoreError)
    assert store.consume_matching(token, token, 0.0) is TokenVerdict.ACCEPTED
    store.issue(0.0)


def test_expired_tokens_are_pruned_for_capacity() -> None:
    store = TokenStore(max_pending=1, ttl_s=0.005)
    store.issue(0.0)
    store.issue(0.006)  # the first expired and was pruned
    assert store.pending_count == 1


def test_random_collisions_are_bounded() -> None:
    fixed = b"\x07" * 16
    store = TokenStore(collision_attempts=3, random_source=lambda n: fixed)
    store.issue(0.0)
    with pytest.raises(TokenCollisionExhausted) as info:
        store.issue(0.0)
    assert info.value.attempts == 3
    assert store.pending_count == 1


def test_collision_retries_until_a_free_candidate() -> None:
    draws = iter([b"\x01" * 16, b"\x01" * 16, b"\x01" * 16, b"\x02" * 16])
    store = TokenStore(collision_attempts=3, random_source=lambda n: next(draws))
    first = store.issue(0.0)
    second = store.issue(0.0)
    assert first.raw == b"\x01" * 16
    assert second.raw == b"\x02" * 16


def test_random_source_with_wrong_length_raises() -> None:
    store = TokenStore(random_source=lambda n: b"abc")
    with pytest.raises(ValueError):
        store.issue(0.0)


def test_zero_and_negative_configuration_clamps() -> None:
    store = TokenStore(max_pending=0, ttl_s=0.0, collision_attempts=0)
    assert (store.max_pending, store.ttl_s, store.collision_attempts) == (1, 0.001, 1)
    negative = TokenStore(max_pending=-5, ttl_s=-3.0, collision_attempts=-1)
    assert (negative.max_pending, negative.ttl_s, negative.collision_attempts) == (1, 0.001, 1)
    assert TokenStore(ttl_s=float("nan")).ttl_s == 0.001


def test_revoke_reports_whether_pending() -> None:
    store = TokenStore()
    token = store.issue(0.0)
    assert store.revoke(token) is True
    assert store.revoke(token) is False
    assert store.consume_matching(token, token, 0.0) is TokenVerdict.NOT_PENDING


def test_prune_expired_counts_removed() -> None:
    store = TokenStore(ttl_s=10.0)
    store.issue(0.0)
    store.issue(1.0)
    store.issue(5.0)
    assert store.prune_expired(9.0) == 0
    assert store.prune_expired(11.0) == 2
    assert store.pending_count == 1
    assert store.prune_expired(15.0) == 1


def test_consume_backend_side() -> None:
    store = TokenStore(ttl_s=1.0)
    token = store.issue(0.0)
    assert store.consume(b"", 0.1) is TokenVerdict.MISSING
    assert store.consume(b"123", 0.1) is TokenVerdict.BAD_LENGTH
    assert store.consume(tok(42), 0.1) is TokenVerdict.NOT_PENDING
    assert store.pending_count == 1
    assert store.consume(token.raw, 0.2) is TokenVerdict.ACCEPTED
    assert store.consume(token, 0.2) is TokenVerdict.NOT_PENDING


def test_consume_backend_side_expired() -> None:
    store = TokenStore(ttl_s=1.0)
    token = store.issue(0.0)
    assert store.consume(token, 1.0) is TokenVerdict.EXPIRED
    assert store.pending_count == 0


def test_insert_reseeds_a_known_token() -> None:
    backend_store = TokenStore(ttl_s=30.0)
    token = TokenStore().issue(0.0)
    assert backend_store.insert(token, 10.0) == 40.0
    assert backend_store.expires_at(token) == 40.0
    assert backend_store.is_pending(token, 39.0)
    # Re-inserting restarts the TTL.
    backend_store.insert(token, 20.0)
    assert backend_store.expires_at(token) == 50.0
    assert backend_store.pending_count == 1
    assert backend_store.consume(token.raw, 45.0) is TokenVerdict.ACCEPTED


def test_insert_respects_capacity() -> None:
    store = TokenStore(max_pending=1)
    store.insert(tok(1), 0.0)
    store.insert(tok(1), 0.0)  # replacing is not growth
    with pytest.raises(TokenStoreFull):
        store.insert(tok(2), 0.0)


def test_parser_accepts_only_exact_128_bit_tokens() -> None:
    for length in range(0, 40):
        parsed = parse_token(b"\x05" * length)
        if length == 16:
            assert isinstance(parsed, HandoffToken)
        elif length == 0:
            assert parsed == TokenRejection(TokenVerdict.MISSING, "handoff token is missing")
        else:
            assert isinstance(parsed, TokenRejection)
            assert parsed.verdict is TokenVerdict.BAD_LENGTH
            assert parsed.detail == f"handoff token length was {length} bytes; expected 16"


def test_verdict_details_match_reference_strings() -> None:
    assert TokenVerdict.MISSING.detail() == "handoff token is missing"
    assert TokenVerdict.BAD_LENGTH.detail(15) == "handoff token length was 15 bytes; expected 16"
    assert TokenVerdict.MISMATCH.detail() == "handoff token mismatch"
    assert TokenVerdict.EXPIRED.detail() == "handoff token expired"
    assert TokenVerdict.NOT_PENDING.detail() == "handoff token is not pending"
    assert TokenVerdict.ACCEPTED.detail() == ""
    assert "16" in TokenVerdict.BAD_LENGTH.detail()
    assert TokenVerdict.ACCEPTED.accepted
    assert not TokenVerdict.MISMATCH.accepted


def test_many_revocations_keep_heap_bounded() -> None:
    store = TokenStore(max_pending=10_000, random_source=counting_source())
    for i in range(5_000):
        store.revoke(store.issue(float(i)))
    assert store.pending_count == 0
    assert len(store._heap) <= 2 * store.pending_count + 64 + 1
