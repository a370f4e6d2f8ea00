"""Handoff fallback policy and failed-attempt rate limit with attempts in flight (seed 000)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

import pytest

from rpbroker.policy.fallback import (
    DEFAULT_FAILED_ATTEMPT_WINDOW_S,
    DEFAULT_MAX_FAILED_ATTEMPTS,
    Attempt,
    AttemptResult,
    Fallback,
    FallbackPolicy,
    FallbackReason,
    FallbackState,
    HandoffInputs,
)

ENABLED = HandoffInputs(client_opted_in=True, service_allows=True, fd_pressure=False)
RATE_LIMITED = FallbackReason.FAILED_ATTEMPT_RATE_LIMITED

K = TypeVar("K", bound=Hashable)


def fail(state: FallbackState[K], key: K, now: float) -> None:
    """One whole attempt for ``key`` that failed at ``now``."""
    state.attempt_started(key)
    state.attempt_ended(key, AttemptResult.FAILED, now)


def succeed(state: FallbackState[K], key: K, now: float) -> None:
    state.attempt_started(key)
    state.attempt_ended(key, AttemptResult.SUCCEEDED, now)


def limited(state: FallbackState[K], key: K, now: float) -> bool:
    decision = state.should_attempt(key, ENABLED, now)
    if isinstance(decision, Fallback):
        assert decision.reason is RATE_LIMITED
        return True
    assert decision == Attempt()
    return False


def test_defaults() -> None:
    assert DEFAULT_MAX_FAILED_ATTEMPTS == 8
    assert DEFAULT_FAILED_ATTEMPT_WINDOW_S == 30.0
    assert FallbackPolicy() == FallbackPolicy(8, 30.0)
    assert FallbackState[str]().policy == FallbackPolicy()
    assert HandoffInputs(True, True, False).backend_adopted is False


def test_zero_policy_values_clamp() -> None:
    assert FallbackPolicy(0, 0.0) == FallbackPolicy(1, 0.001)
    assert FallbackPolicy(-3, -1.0) == FallbackPolicy(1, 0.001)
    assert FallbackPolicy(2, float("nan")).window_s == 0.001


def test_enabled_inputs_attempt() -> None:
    state = FallbackState[str]()
    assert state.should_attempt("be", ENABLED, 0.0) == Attempt()
    assert len(state) == 0  # deciding tracks nothing


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        (HandoffInputs(False, True, False), FallbackReason.CLIENT_UNSUPPORTED),
        (HandoffInputs(True, False, False), FallbackReason.SERVICE_POLICY_DISABLED),
        (HandoffInputs(True, True, True), FallbackReason.FD_PRESSURE_DISABLED),
        (HandoffInputs(True, True, False, True), FallbackReason.ADOPTED_BACKEND),
        (
            HandoffInputs(True, True, False, backend_has_control_channel=False),
            FallbackReason.NO_CONTROL_CHANNEL,
        ),
    ],
)
def test_disabled_inputs_skip_handoff_with_silent_reconnect(
    inputs: HandoffInputs, reason: FallbackReason
) -> None:
    decision = FallbackState[str]().should_attempt("be", inputs, 0.0)
    assert decision == Fallback(reason)
    assert isinstance(decision, Fallback)
    assert decision.retry_after_s is None


def test_check_order_first_failing_input_wins() -> None:
    state = FallbackState[str]()
    everything_off = HandoffInputs(False, False, True, True)
    decision = state.should_attempt("be", everything_off, 0.0)
    assert isinstance(decision, Fallback)
    assert decision.reason is FallbackReason.CLIENT_UNSUPPORTED
    decision = state.should_attempt("be", HandoffInputs(True, False, True, True), 0.0)
    assert isinstance(decision, Fallback)
    assert decision.reason is FallbackReason.SERVICE_POLICY_DISABLED
    decision = state.should_attempt("be", HandoffInputs(True, True, True, True), 0.0)
    assert isinstance(decision, Fallback)
    assert decision.reason is FallbackReason.FD_PRESSURE_DISABLED


def test_a_backend_without_control_channel_says_so_before_any_policy_reason() -> None:
    # A foreign backend: even with handoff disabled by policy and fd pressure, the
    # reason given is the one that really holds; a client not asking still hears nothing.
    state = FallbackState[str](FallbackPolicy(1, 30.0))
    fail(state, "be", 0.0)
    foreign = HandoffInputs(True, False, True, backend_has_control_channel=False)
    assert state.should_attempt("be", foreign, 1.0) == Fallback(FallbackReason.NO_CONTROL_CHANNEL)
    not_asking = HandoffInputs(False, True, False, backend_has_control_channel=False)
    assert state.should_attempt("be", not_asking, 1.0) == Fallback(
        FallbackReason.CLIENT_UNSUPPORTED
    )


def test_static_reasons_win_over_rate_limit() -> None:
    state = FallbackState[str](FallbackPolicy(1, 30.0))
    fail(state, "be", 0.0)
    decision = state.should_attempt("be", HandoffInputs(True, True, False, True), 1.0)
    assert isinstance(decision, Fallback)
    assert decision.reason is FallbackReason.ADOPTED_BACKEND


def test_adopted_existing_backends_always_use_reconnect_fallback() -> None:
    state = FallbackState[str]()
    for client in (True, False):
        decision = state.should_attempt("be", HandoffInputs(client, True, False, True), 0.0)
        assert isinstance(decision, Fallback)
        expected = FallbackReason.ADOPTED_BACKEND if client else FallbackReason.CLIENT_UNSUPPORTED
        assert decision.reason is expected


def test_fallback_reason_values_match_reference() -> None:
    assert [reason.value for reason in FallbackReason] == [
        "client_unsupported",
        "service_policy_disabled",
        "fd_pressure_disabled",
        "adopted_backend",
        "failed_attempt_rate_limited",
        "permission_denied",
        "integrity_mismatch",
        "backend_ack_timeout",
        "token_unavailable",
        "backend_no_control_channel",
    ]
    assert Fallback(FallbackReason.TOKEN_UNAVAILABLE).retry_after_s is None


def test_failed_handoff_attempts_are_bounded_and_then_rate_limited() -> None:
    state = FallbackState[str](FallbackPolicy(2, 30.0))
    fail(state, "be", 0.0)
    assert not limited(state, "be", 0.5)
    fail(state, "be", 1.0)
    fail(state, "be", 2.0)  # counted, capped at the limit
    decision = state.should_attempt("be", ENABLED, 10.0)
    assert decision == Fallback(RATE_LIMITED, retry_after_s=20.0)
    assert state.should_attempt("be", ENABLED, 31.0) == Attempt()


def test_rate_limit_retry_after_is_rest_of_window() -> None:
    state = FallbackState[str](FallbackPolicy(1, 30.0))
    fail(state, "be", 100.0)
    for now, remaining in [(100.0, 30.0), (112.5, 17.5), (129.0, 1.0)]:
        decision = state.should_attempt("be", ENABLED, now)
        assert isinstance(decision, Fallback)
        assert decision.retry_after_s == pytest.approx(remaining)
    assert state.should_attempt("be", ENABLED, 130.0) == Attempt()


def test_window_starts_at_first_failure_and_rolls_over() -> None:
    state = FallbackState[str](FallbackPolicy(3, 10.0))
    fail(state, "be", 0.0)
    fail(state, "be", 9.0)
    assert not limited(state, "be", 9.5)
    # 10 s after the first failure a new window starts with this failure ...
    fail(state, "be", 10.0)
    assert not limited(state, "be", 10.0)
    fail(state, "be", 11.0)
    fail(state, "be", 12.0)
    # ... so three failures only now, and the window ends 10 s after it restarted.
    decision = state.should_attempt("be", ENABLED, 12.0)
    assert decision == Fallback(RATE_LIMITED, retry_after_s=8.0)
    assert limited(state, "be", 19.9)
    assert not limited(state, "be", 20.0)


def test_successful_handoff_resets_failed_attempt_budget() -> None:
    state = FallbackState[str](FallbackPolicy(2, 30.0))
    fail(state, "be", 0.0)
    fail(state, "be", 0.0)
    assert limited(state, "be", 1.0)
    succeed(state, "be", 1.0)
    assert state.should_attempt("be", ENABLED, 1.0) == Attempt()
    assert len(state) == 0
    # One new failure after the reset is one, not three.
    fail(state, "be", 2.0)
    assert not limited(state, "be", 2.0)


def test_failure_budgets_are_per_backend() -> None:
    state = FallbackState[tuple[str, str]](FallbackPolicy(1, 30.0))
    fail(state, ("svc", "1.0.0"), 0.0)
    assert limited(state, ("svc", "1.0.0"), 1.0)
    assert state.should_attempt(("svc", "2.0.0"), ENABLED, 1.0) == Attempt()


def test_run_out_windows_are_dropped_so_memory_stays_bounded() -> None:
    state = FallbackState[Hashable](FallbackPolicy(8, 1.0))
    for i in range(1_000):
        fail(state, i, float(i) * 0.01)
    assert len(state) <= 101
    fail(state, "late", 100.0)
    assert len(state) == 1


def test_memory_stays_bounded_while_another_backend_has_attempts_in_flight() -> None:
    state = FallbackState[Hashable](FallbackPolicy(8, 1.0))
    state.attempt_started("busy")  # a healthy backend, busy for the whole test
    for i in range(1_000):
        fail(state, i, float(i) * 0.01)
    # Docstring: memory stays proportional to recently failing backends plus those
    # with attempts in flight (here: the last second's 100 and "busy").
    assert len(state) <= 102


@pytest.mark.parametrize(
    "reason", [FallbackReason.PERMISSION_DENIED, FallbackReason.INTEGRITY_MISMATCH]
)
def test_permission_and_integrity_failures_fall_back_without_client_error(
    reason: FallbackReason,
) -> None:
    state = FallbackState[str]()
    assert state.should_attempt("be", ENABLED, 0.0) == Attempt()
    fail(state, "be", 0.0)
    assert Fallback(reason).retry_after_s is None
    # One failure does not yet suppress attempts.
    assert state.should_attempt("be", ENABLED, 0.1) == Attempt()


# -- attempts in flight ---------------------------------------------------------------


def test_ninth_attempt_is_refused_while_the_eighths_failure_is_not_in_yet() -> None:
    state = FallbackState[str]()
    for n in range(7):
        assert not limited(state, "be", float(n))
        fail(state, "be", float(n))
    assert not limited(state, "be", 7.0)
    state.attempt_started("be")  # the 8th: its failure is not recorded yet
    decision = state.should_attempt("be", ENABLED, 7.5)
    assert decision == Fallback(RATE_LIMITED, retry_after_s=22.5)
    # Its failure arrives: still refused, for the rest of the same window.
    state.attempt_ended("be", AttemptResult.FAILED, 8.0)
    assert state.should_attempt("be", ENABLED, 8.0) == Fallback(RATE_LIMITED, retry_after_s=22.0)


def test_healthy_backend_with_many_attempts_in_flight_is_never_limited() -> None:
    state = FallbackState[str]()
    for n in range(1_000):
        assert state.should_attempt("be", ENABLED, n * 0.001) == Attempt()
        state.attempt_started("be")
    assert len(state) == 1
    for n in range(1_000):
        state.attempt_ended("be", AttemptResult.SUCCEEDED, 1.0 + n * 0.001)
    assert len(state) == 0


def test_in_flight_attempts_count_once_the_backend_fails() -> None:
    state = FallbackState[str](FallbackPolicy(4, 30.0))
    for _ in range(3):
        state.attempt_started("be")  # started while healthy
    assert not limited(state, "be", 0.0)
    state.attempt_started("be")
    state.attempt_ended("be", AttemptResult.FAILED, 1.0)
    # One failure plus three in flight reach the limit of four.
    assert limited(state, "be", 1.0)
    # Any success clears the failures; the rest in flight no longer count.
    state.attempt_ended("be", AttemptResult.SUCCEEDED, 2.0)
    assert not limited(state, "be", 2.0)
    assert len(state) == 1  # two still in flight
    state.attempt_ended("be", AttemptResult.SUCCEEDED, 2.1)
    state.attempt_ended("be", AttemptResult.SUCCEEDED, 2.2)
    assert len(state) == 0


def test_abandoned_attempt_counts_neither_way() -> None:
    state = FallbackState[str]()
    for n in range(7):
        fail(state, "be", float(n))
    state.attempt_started("be")
    assert limited(state, "be", 7.0)  # seven failures plus one in flight
    state.attempt_ended("be", AttemptResult.ABANDONED, 7.5)
    # Not a failure: seven failures and nothing in flight leave room for one more.
    assert not limited(state, "be", 7.5)
    # Not a success either: the seven are still counted, so one more failure limits.
    fail(state, "be", 8.0)
    assert state.should_attempt("be", ENABLED, 8.0) == Fallback(RATE_LIMITED, retry_after_s=22.0)


def test_abandoned_attempt_of_a_healthy_backend_leaves_nothing_behind() -> None:
    state = FallbackState[str]()
    state.attempt_started("be")
    assert len(state) == 1
    state.attempt_ended("be", AttemptResult.ABANDONED, 0.5)
    assert len(state) == 0
    assert state.should_attempt("be", ENABLED, 0.5) == Attempt()


def test_window_running_out_forgets_failures_but_keeps_attempts_in_flight() -> None:
    state = FallbackState[str](FallbackPolicy(2, 10.0))
    fail(state, "be", 0.0)
    state.attempt_started("be")
    assert limited(state, "be", 5.0)
    assert not limited(state, "be", 10.0)  # the window ran out
    assert len(state) == 1  # the attempt is still in flight
    # Its failure opens a new window with one failure; one more attempt in flight limits.
    state.attempt_ended("be", AttemptResult.FAILED, 11.0)
    assert not limited(state, "be", 11.0)
    state.attempt_started("be")
    assert state.should_attempt("be", ENABLED, 12.0) == Fallback(RATE_LIMITED, retry_after_s=9.0)


def test_ending_an_attempt_that_never_started_does_not_go_negative() -> None:
    state = FallbackState[str](FallbackPolicy(2, 30.0))
    state.attempt_ended("be", AttemptResult.ABANDONED, 0.0)
    assert len(state) == 0
    state.attempt_ended("be", AttemptResult.FAILED, 0.0)  # counted, nothing in flight
    assert not limited(state, "be", 0.0)
    state.attempt_started("be")
    assert limited(state, "be", 0.0)  # one failure plus exactly one in flight
