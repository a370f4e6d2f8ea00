"""Descriptor-pressure guard (facts §7)."""

from __future__ import annotations

from rpbroker.policy.fd_pressure import (
    DEFAULT_FD_PRESSURE_RETRY_AFTER_S,
    DEFAULT_RECOVERY_ACCEPTS,
    FD_PRESSURE_ACCEPT_BACKOFF_S,
    FD_PRESSURE_REASON,
    Demotion,
    FdPressureGuard,
)
from rpbroker.policy.hello import Refusal
from rpbroker.wire.codes import RefusalCode


def test_defaults() -> None:
    assert DEFAULT_RECOVERY_ACCEPTS == 3
    assert DEFAULT_FD_PRESSURE_RETRY_AFTER_S == 1.0
    assert FD_PRESSURE_ACCEPT_BACKOFF_S == 0.05
    guard = FdPressureGuard()
    assert not guard.demoted
    assert (guard.episodes, guard.refusals) == (0, 0)


def test_fd_exhaustion_demotes_and_backs_off() -> None:
    guard = FdPressureGuard()
    assert guard.on_fd_exhausted() == Demotion(backoff_s=0.05, first=True)
    assert guard.demoted
    assert guard.episodes == 1


def test_only_the_first_error_of_an_episode_is_flagged() -> None:
    guard = FdPressureGuard()
    assert guard.on_fd_exhausted().first
    assert guard.on_fd_exhausted() == Demotion(0.05, first=False)
    assert guard.on_fd_exhausted() == Demotion(0.05, first=False)
    assert guard.episodes == 1
    assert guard.demoted


def test_recovers_after_three_consecutive_accepts() -> None:
    guard = FdPressureGuard()
    guard.on_fd_exhausted()
    assert guard.on_accept_ok() is False
    assert guard.on_accept_ok() is False
    assert guard.demoted
    assert guard.on_accept_ok() is True
    assert not guard.demoted
    # The streak starts from zero in the next episode.
    guard.on_fd_exhausted()
    assert guard.on_accept_ok() is False
    assert guard.on_accept_ok() is False
    assert guard.on_accept_ok() is True


def test_an_error_resets_the_recovery_streak() -> None:
    guard = FdPressureGuard()
    guard.on_fd_exhausted()
    guard.on_accept_ok()
    guard.on_accept_ok()
    assert guard.on_fd_exhausted() == Demotion(0.05, first=False)
    guard.on_accept_ok()
    guard.on_accept_ok()
    assert guard.demoted
    assert guard.on_accept_ok() is True


def test_healthy_accepts_do_nothing() -> None:
    guard = FdPressureGuard()
    for _ in range(5):
        assert guard.on_accept_ok() is False
    assert not guard.demoted
    # Healthy accepts do not bank a streak for a later demotion.
    guard.on_fd_exhausted()
    assert guard.on_accept_ok() is False


def test_a_new_episode_after_recovery_is_counted_and_flagged() -> None:
    guard = FdPressureGuard(recovery_accepts=1)
    guard.on_fd_exhausted()
    assert guard.on_accept_ok() is True
    assert guard.on_fd_exhausted().first
    assert guard.episodes == 2


def test_refusal_code_reason_and_retry_after() -> None:
    guard = FdPressureGuard()
    guard.on_fd_exhausted()
    refusal = guard.refusal()
    assert refusal == Refusal(
        RefusalCode.FD_PRESSURE, "broker is low on file descriptors; retry shortly", 1000
    )
    assert refusal.reason == FD_PRESSURE_REASON
    assert int(refusal.code) == 9
    guard.refusal()
    assert guard.refusals == 2


def test_retry_after_rounds_up_to_whole_milliseconds() -> None:
    assert FdPressureGuard(retry_after_s=0.0012).refusal().retry_after_ms == 2
    assert FdPressureGuard(retry_after_s=0.3).refusal().retry_after_ms == 300


def test_zero_configuration_clamps() -> None:
    guard = FdPressureGuard(recovery_accepts=0, retry_after_s=0.0, backoff_s=-1.0)
    assert guard.refusal().retry_after_ms == 1
    assert guard.on_fd_exhausted() == Demotion(0.001, first=True)
    assert guard.on_accept_ok() is True  # one accept is the least that clears it


def test_custom_backoff() -> None:
    guard = FdPressureGuard(backoff_s=0.2)
    assert guard.on_fd_exhausted().backoff_s == 0.2
