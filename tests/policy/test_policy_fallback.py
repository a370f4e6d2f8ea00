"""Handoff fallback policy and failed-attempt rate limit (seed 000)."""

from __future__ import annotations

import pytest

from rpbroker.policy.fallback import (
    ATTEMPT,
    DEFAULT_FAILED_ATTEMPT_WINDOW_S,
    DEFAULT_MAX_FAILED_ATTEMPTS,
    Attempt,
    Fallback,
    FallbackPolicy,
    FallbackReason,
    FallbackState,
    HandoffInputs,
)

ENABLED = HandoffInputs.enabled()


def test_defaults() -> None:
    assert DEFAULT_MAX_FAILED_ATTEMPTS == 8
    assert DEFAULT_FAILED_ATTEMPT_WINDOW_S == 30.0
    assert FallbackPolicy() == FallbackPolicy(8, 30.0)
    assert FallbackState().policy == FallbackPolicy()


def test_zero_policy_values_clamp() -> None:
    assert FallbackPolicy(0, 0.0) == FallbackPolicy(1, 0.001)
    assert FallbackPolicy(-3, -1.0) == FallbackPolicy(1, 0.001)


def test_enabled_inputs_attempt() -> None:
    state = FallbackState()
    assert state.should_attempt("be", ENABLED, 0.0) == ATTEMPT
    assert state.should_attempt("be", ENABLED, 0.0) == Attempt()
    assert not ATTEMPT.uses_backend_reconnect
    assert not ATTEMPT.sends_client_error


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        (HandoffInputs(False, True, False), FallbackReason.CLIENT_UNSUPPORTED),
        (HandoffInputs(True, False, False), FallbackReason.SERVICE_POLICY_DISABLED),
        (HandoffInputs(True, True, True), FallbackReason.FD_PRESSURE_DISABLED),
        (HandoffInputs(True, True, False, True), FallbackReason.ADOPTED_BACKEND),
    ],
)
def test_disabled_inputs_skip_handoff_with_silent_reconnect(
    inputs: HandoffInputs, reason: FallbackReason
) -> None:
    decision = FallbackState().should_attempt("be", inputs, 0.0)
    assert decision == Fallback(reason)
    assert isinstance(decision, Fallback)
    assert decision.retry_after_s is None
    assert decision.uses_backend_reconnect
    assert not decision.sends_client_error


def test_check_order_first_failing_input_wins() -> None:
    state = FallbackState()
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


def test_static_reasons_win_over_rate_limit() -> None:
    state = FallbackState(FallbackPolicy(1, 30.0))
    state.record_failure("be", 0.0)
    decision = state.should_attempt("be", HandoffInputs(True, True, False, True), 1.0)
    assert isinstance(decision, Fallback)
    assert decision.reason is FallbackReason.ADOPTED_BACKEND


def test_adopted_existing_backends_always_use_reconnect_fallback() -> None:
    state = FallbackState()
    for client in (True, False):
        decision = state.should_attempt("be", HandoffInputs(client, True, False, True), 0.0)
        assert isinstance(decision, Fallback)
        expected = FallbackReason.ADOPTED_BACKEND if client else FallbackReason.CLIENT_UNSUPPORTED
        assert decision.reason is expected


def test_every_fallback_reason_stays_silent_reconnect() -> None:
    assert len(FallbackReason) == 8
    for reason in FallbackReason:
        decision = Fallback(reason)
        assert decision.uses_backend_reconnect
        assert not decision.sends_client_error


def test_failed_handoff_attempts_are_bounded_and_then_rate_limited() -> None:
    state = FallbackState(FallbackPolicy(2, 30.0))
    assert state.record_failure("be", 0.0) == 1
    assert state.record_failure("be", 1.0) == 2
    assert state.record_failure("be", 2.0) == 2
    assert state.failed_count("be", 2.0) == 2
    decision = state.should_attempt("be", ENABLED, 10.0)
    assert decision == Fallback(FallbackReason.FAILED_ATTEMPT_RATE_LIMITED, retry_after_s=20.0)
    assert decision.uses_backend_reconnect
    assert state.should_attempt("be", ENABLED, 31.0) == ATTEMPT
    assert state.failed_count("be", 31.0) == 0


def test_rate_limit_retry_after_is_rest_of_window() -> None:
    state = FallbackState(FallbackPolicy(1, 30.0))
    state.record_failure("be", 100.0)
    for now, remaining in [(100.0, 30.0), (112.5, 17.5), (129.0, 1.0)]:
        decision = state.should_attempt("be", ENABLED, now)
        assert isinstance(decision, Fallback)
        assert decision.retry_after_s == pytest.approx(remaining)
    assert state.should_attempt("be", ENABLED, 130.0) == ATTEMPT


def test_window_starts_at_first_failure_and_rolls_over() -> None:
    state = FallbackState(FallbackPolicy(3, 10.0))
    state.record_failure("be", 0.0)
    state.record_failure("be", 9.0)
    assert state.failed_count("be", 9.5) == 2
    # 10 s after the first failure a new window starts with this failure.
    assert state.record_failure("be", 10.0) == 1
    assert state.failed_count("be", 19.9) == 1
    assert state.failed_count("be", 20.0) == 0


def test_successful_handoff_resets_failed_attempt_budget() -> None:
    state = FallbackState(FallbackPolicy(2, 30.0))
    state.record_failure("be", 0.0)
    state.record_failure("be", 0.0)
    assert isinstance(state.should_attempt("be", ENABLED, 1.0), Fallback)
    state.record_success("be")
    assert state.failed_count("be", 1.0) == 0
    assert state.should_attempt("be", ENABLED, 1.0) == ATTEMPT
    state.record_success("never-seen")  # harmless


def test_failure_budgets_are_per_backend() -> None:
    state = FallbackState(FallbackPolicy(1, 30.0))
    state.record_failure(("svc", "1.0.0"), 0.0)
    assert isinstance(state.should_attempt(("svc", "1.0.0"), ENABLED, 1.0), Fallback)
    assert state.should_attempt(("svc", "2.0.0"), ENABLED, 1.0) == ATTEMPT


def test_run_out_windows_are_dropped_so_memory_stays_bounded() -> None:
    state = FallbackState(FallbackPolicy(8, 1.0))
    for i in range(1_000):
        state.record_failure(i, float(i) * 0.01)
    assert len(state) <= 101
    state.record_failure("late", 100.0)
    assert len(state) == 1


@pytest.mark.parametrize(
    "reason", [FallbackReason.PERMISSION_DENIED, FallbackReason.INTEGRITY_MISMATCH]
)
def test_permission_and_integrity_failures_fall_back_without_client_error(
    reason: FallbackReason,
) -> None:
    state = FallbackState()
    assert state.should_attempt("be", ENABLED, 0.0) == ATTEMPT
    assert state.record_failure("be", 0.0) == 1
    decision = Fallback(reason)
    assert decision.uses_backend_reconnect
    assert not decision.sends_client_error
    # One failure does not yet suppress attempts.
    assert state.should_attempt("be", ENABLED, 0.1) == ATTEMPT
