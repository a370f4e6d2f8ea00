"""Handoff tokens: the value, parsing, verdict details, and the store (facts §1)."""

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


def test_default_store_holds_1024_tokens() -> None:
    store = TokenStore()
    for _ in range(1024):
        store.issue(0.0)
    with pytest.raises(TokenStoreFull) as info:
        store.issue(0.0)
    assert info.value.max_pending == 1024
    assert str(info.value) == "pending handoff token limit reached (1024)"


def test_default_ttl_is_thirty_seconds() -> None:
    store = TokenStore()
    token = store.issue(0.0)
    store.issue(29.999)  # issuing prunes what expired: not this one yet
    assert len(store) == 2
    store.issue(30.0)
    assert len(store) == 2
    assert store.revoke(token) is False  # expired exactly at issued + ttl, and pruned


def test_default_collision_attempts_is_sixteen() -> None:
    draws = itertools.count()
    fixed = b"\x07" * 16

    def source(n: int) -> bytes:
        next(draws)
        return fixed

    store = TokenStore(random_source=source)
    store.issue(0.0)
    with pytest.raises(TokenCollisionExhausted) as info:
        store.issue(0.0)
    assert info.value.attempts == 16
    assert next(draws) == 1 + 16


def test_generated_token_is_128_bits() -> None:
    token = TokenStore().issue(0.0)
    assert len(token.raw) == 16
    assert len(HandoffToken.generate().raw) == 16
    assert bytes(token) == token.raw


def test_generate_uses_the_given_source() -> None:
    assert HandoffToken.generate(lambda n: b"\x01" * n) == HandoffToken(b"\x01" * 16)


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
    assert HandoffToken(memoryview(b"x" * 16)) == a


def test_each_issue_is_distinct() -> None:
    store = TokenStore()
    tokens = {store.issue(0.0) for _ in range(50)}
    assert len(tokens) == 50
    assert len(store) == 50


def test_expired_exactly_at_ttl_boundary() -> None:
    store = TokenStore(ttl_s=10.0, random_source=counting_source())
    token = store.issue(5.0)
    store.issue(14.999)
    assert len(store) == 2
    store.issue(15.0)
    assert len(store) == 2  # the first was pruned, the third added
    assert store.revoke(token) is False


def test_expired_tokens_stay_held_until_the_next_issue_prunes_them() -> None:
    store = TokenStore(ttl_s=1.0)
    token = store.issue(0.0)
    # Nothing reads the clock between issues: the expired token is still held.
    assert len(store) == 1
    assert store.revoke(token) is True


def test_pending_tokens_are_capacity_bounded_until_revoked() -> None:
    store = TokenStore(max_pending=1)
    token = store.issue(0.0)
    with pytest.raises(TokenStoreFull) as info:
        store.issue(0.0)
    assert info.value.max_pending == 1
    assert isinstance(info.value, TokenStoreError)
    assert len(store) == 1  # a refused issue holds nothing
    assert store.revoke(token) is True
    store.issue(0.0)
    assert len(store) == 1


def test_expired_tokens_are_pruned_for_capacity() -> None:
    store = TokenStore(max_pending=1, ttl_s=0.005)
    store.issue(0.0)
    store.issue(0.006)  # the first expired and was pruned
    assert len(store) == 1


def test_random_collisions_are_bounded() -> None:
    fixed = b"\x07" * 16
    store = TokenStore(collision_attempts=3, random_source=lambda n: fixed)
    store.issue(0.0)
    with pytest.raises(TokenCollisionExhausted) as info:
        store.issue(0.0)
    assert info.value.attempts == 3
    assert isinstance(info.value, TokenStoreError)
    assert str(info.value) == "handoff token collisions exhausted after 3 attempts"
    assert len(store) == 1


def test_collision_retries_until_a_free_candidate() -> None:
    draws = iter([b"\x01" * 16, b"\x01" * 16, b"\x01" * 16, b"\x02" * 16])
    store = TokenStore(collision_attempts=3, random_source=lambda n: next(draws))
    first = store.issue(0.0)
    second = store.issue(0.0)
    assert first.raw == b"\x01" * 16
    assert second.raw == b"\x02" * 16


def test_a_revoked_value_may_be_drawn_again() -> None:
    store = TokenStore(random_source=lambda n: b"\x03" * n)
    first = store.issue(0.0)
    store.revoke(first)
    assert store.issue(0.0) == first


def test_random_source_with_wrong_length_raises() -> None:
    store = TokenStore(random_source=lambda n: b"abc")
    with pytest.raises(ValueError):
        store.issue(0.0)
    assert len(store) == 0


@pytest.mark.parametrize(
    ("max_pending", "ttl_s", "attempts"), [(0, 0.0, 0), (-5, -3.0, -1), (0, float("nan"), 0)]
)
def test_zero_and_negative_configuration_clamps(
    max_pending: int, ttl_s: float, attempts: int
) -> None:
    full = TokenStore(max_pending=max_pending)
    full.issue(0.0)
    with pytest.raises(TokenStoreFull) as capacity:
        full.issue(0.0)
    assert capacity.value.max_pending == 1

    short = TokenStore(ttl_s=ttl_s)
    first = short.issue(0.0)
    short.issue(0.0009)
    assert len(short) == 2
    short.issue(0.001)  # a 1 ms time-to-live: the first expired and was pruned
    assert short.revoke(first) is False

    colliding = TokenStore(collision_attempts=attempts, random_source=lambda n: b"\x09" * n)
    colliding.issue(0.0)
    with pytest.raises(TokenCollisionExhausted) as collision:
        colliding.issue(0.0)
    assert collision.value.attempts == 1


def test_revoke_reports_whether_held() -> None:
    store = TokenStore()
    token = store.issue(0.0)
    assert store.revoke(token) is True
    assert store.revoke(token) is False
    assert store.revoke(tok(42)) is False
    assert len(store) == 0


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


def test_parser_accepts_bytearray_and_memoryview() -> None:
    assert parse_token(bytearray(b"\x05" * 16)) == HandoffToken(b"\x05" * 16)
    assert parse_token(memoryview(b"\x05" * 16)) == HandoffToken(b"\x05" * 16)


def test_verdict_details_match_reference_strings() -> None:
    assert TokenVerdict.MISSING.detail() == "handoff token is missing"
    assert TokenVerdict.BAD_LENGTH.detail(15) == "handoff token length was 15 bytes; expected 16"
    assert TokenVerdict.MISMATCH.detail() == "handoff token mismatch"
    assert TokenVerdict.EXPIRED.detail() == "handoff token expired"
    assert TokenVerdict.NOT_PENDING.detail() == "handoff token is not pending"
    assert TokenVerdict.ACCEPTED.detail() == ""
    assert "16" in TokenVerdict.BAD_LENGTH.detail()
    assert TokenVerdict.BAD_LENGTH.detail() == ("handoff token has the wrong length; expected 16")


def test_verdict_values() -> None:
    assert [v.value for v in TokenVerdict] == [
        "accepted",
        "not_pending",
        "expired",
        "mismatch",
        "missing",
        "bad_length",
    ]


def test_many_revocations_keep_heap_bounded() -> None:
    store = TokenStore(max_pending=10_000, random_source=counting_source())
    for i in range(5_000):
        store.revoke(store.issue(float(i)))
    assert len(store) == 0
    assert len(store._heap) <= 2 * len(store) + 64 + 1


def test_heap_stays_bounded_when_tokens_expire() -> None:
    store = TokenStore(max_pending=10, ttl_s=1.0, random_source=counting_source())
    for i in range(5_000):
        store.issue(float(i))
    assert len(store) == 1
    assert len(store._heap) <= 2 * len(store) + 64 + 1
