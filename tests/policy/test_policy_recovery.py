"""Crash recovery: one retry, then unavailable for the rest of the window (seed 002)."""

from __future__ import annotations

import pytest

from rpbroker.policy.recovery import (
    DEFAULT_RECOVERY_WINDOW_S,
    DEFAULT_RETRY_BACKOFF_S,
    CrashRecovery,
    MarkUnavailable,
    RetryAfterBackoff,
)

KEY = ("shared", "zccache", "1.2.3")
Key = tuple[str, str, str]


def test_defaults() -> None:
    assert DEFAULT_RETRY_BACKOFF_S == 0.25
    assert DEFAULT_RECOVERY_WINDOW_S == 30.0
    recovery = CrashRecovery[Key]()
    assert recovery.record_crash(KEY, 0.0) == RetryAfterBackoff(0.25, attempt=1)
    assert recovery.record_crash(KEY, 0.0) == MarkUnavailable(30.0)
    assert recovery.unavailable(KEY, 29.999) is not None
    assert recovery.unavailable(KEY, 30.0) is None


def test_zero_durations_clamp() -> None:
    recovery = CrashRecovery[Key](0.0, -2.0)
    assert recovery.record_crash(KEY, 0.0) == RetryAfterBackoff(0.001, 1)
    second = recovery.record_crash(KEY, 0.0005)
    assert isinstance(second, MarkUnavailable)
    assert second.retry_after_s == pytest.approx(0.0005)
    # The window is 1 ms: a crash 1 ms after the first is a first crash again.
    assert recovery.record_crash(KEY, 0.001) == RetryAfterBackoff(0.001, 1)


def test_first_crash_permits_retry_after_backoff() -> None:
    recovery = CrashRecovery[Key](backoff_s=0.075)
    assert recovery.record_crash(KEY, 0.0) == RetryAfterBackoff(0.075, attempt=1)
    assert recovery.unavailable(KEY, 0.0) is None
    assert recovery.crashes_in_window(KEY, 0.0) == 1


def test_second_crash_refuses_backend_unavailable_with_retry_after() -> None:
    recovery = CrashRecovery[Key](backoff_s=0.075)
    recovery.record_crash(KEY, 0.0)
    decision = recovery.record_crash(KEY, 2.0)
    assert decision == MarkUnavailable(28.0)
    assert isinstance(decision, MarkUnavailable)
    assert decision.retry_after_ms == 28_000
    # 30 s after the window opened, a crash is a first crash again.
    assert recovery.record_crash(KEY, 30.0) == RetryAfterBackoff(0.075, 1)


def test_third_crash_in_window_still_unavailable() -> None:
    recovery = CrashRecovery[Key]()
    recovery.record_crash(KEY, 0.0)
    recovery.record_crash(KEY, 1.0)
    assert recovery.record_crash(KEY, 5.0) == MarkUnavailable(25.0)
    assert recovery.crashes_in_window(KEY, 5.0) == 3


def test_unavailable_until_the_window_ends() -> None:
    recovery = CrashRecovery[Key]()
    recovery.record_crash(KEY, 10.0)
    recovery.record_crash(KEY, 11.0)
    assert recovery.unavailable(KEY, 11.0) == MarkUnavailable(29.0)
    refusal = recovery.unavailable(KEY, 39.5)
    assert refusal is not None
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert refusal.retry_after_ms == 500
    assert recovery.unavailable(KEY, 40.0) is None
    assert recovery.crashes_in_window(KEY, 40.0) == 0


def test_successful_recovery_resets_crash_state() -> None:
    recovery = CrashRecovery[Key | str]()
    recovery.record_crash(KEY, 0.0)
    recovery.record_crash(KEY, 1.0)
    recovery.record_success(KEY)
    assert recovery.unavailable(KEY, 1.0) is None
    assert recovery.crashes_in_window(KEY, 1.0) == 0
    assert len(recovery) == 0
    assert recovery.record_crash(KEY, 2.0) == RetryAfterBackoff(0.25, 1)
    recovery.record_success("unknown")
    assert len(recovery) == 1


def test_run_out_windows_are_forgotten_when_looked_at() -> None:
    recovery = CrashRecovery[Key](window_s=10.0)
    recovery.record_crash(KEY, 0.0)
    assert len(recovery) == 1
    assert recovery.crashes_in_window(KEY, 4.0) == 1
    assert recovery.crashes_in_window(KEY, 10.0) == 0
    assert len(recovery) == 0


def test_keys_are_independent() -> None:
    recovery = CrashRecovery[str]()
    recovery.record_crash("a", 0.0)
    recovery.record_crash("a", 0.5)
    assert isinstance(recovery.record_crash("b", 0.5), RetryAfterBackoff)
    assert recovery.unavailable("b", 0.5) is None
    assert recovery.unavailable("a", 0.5) is not None


def test_retry_after_ms_is_at_least_one() -> None:
    assert MarkUnavailable(0.0).retry_after_ms == 1
    assert MarkUnavailable(0.0001).retry_after_ms == 1
    assert MarkUnavailable(0.3).retry_after_ms == 300
