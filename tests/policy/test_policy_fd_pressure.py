"""Descriptor-pressure guard (facts §7)."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from rpbroker.policy.fd_pressure import (
    DEFAULT_FD_PRESSURE_RETRY_AFTER_S,
    DEFAULT_RECOVERY_ACCEPTS,
    FD_PRESSURE_ACCEPT_BACKOFF_S,
    AcceptErrorAction,
    AcceptErrorDecision,
    AcceptErrorKind,
    FdPressureGuard,
    classify_accept_error,
)
from rpbroker.policy.hello import Refusal
from rpbroker.wire.codes import RefusalCode

FD = AcceptErrorKind.FD_EXHAUSTED


def test_defaults() -> None:
    assert DEFAULT_RECOVERY_ACCEPTS == 3
    assert DEFAULT_FD_PRESSURE_RETRY_AFTER_S == 1.0
    assert FD_PRESSURE_ACCEPT_BACKOFF_S == 0.05
    guard = FdPressureGuard()
    assert not guard.demoted
    assert (guard.episodes, guard.refusals, guard.recovery_accepts) == (0, 0, 3)


def test_classify_accept_errors() -> None:
    assert classify_accept_error(OSError(errno.EMFILE, "too many")) is FD
    assert classify_accept_error(OSError(errno.ENFILE, "table full")) is FD
    assert classify_accept_error(OSError(errno.ECONNABORTED, "x")) is AcceptErrorKind.OTHER
    assert classify_accept_error(ValueError("x")) is AcceptErrorKind.OTHER


def test_fd_exhaustion_demotes_and_backs_off() -> None:
    guard = FdPressureGuard()
    decision = guard.on_accept_error(FD)
    assert decision == AcceptErrorDecision(
        AcceptErrorAction.BACK_OFF_AND_CONTINUE, 0.05, first_demotion=True
    )
    assert guard.demoted
    assert guard.episodes == 1


def test_only_the_first_error_of_an_episode_is_flagged() -> None:
    guard = FdPressureGuard()
    assert guard.on_accept_error(FD).first_demotion
    second = guard.on_accept_error(FD)
    assert second.action is AcceptErrorAction.BACK_OFF_AND_CONTINUE
    assert not second.first_demotion
    assert guard.episodes == 1
    assert guard.exhaustion_errors == 2


def test_unrelated_errors_stop_and_do_not_demote() -> None:
    guard = FdPressureGuard()
    decision = guard.on_accept_error(AcceptErrorKind.OTHER)
    assert decision.action is AcceptErrorAction.STOP
    assert decision.backoff_s is None
    assert not guard.demoted
    assert guard.episodes == 0


def test_recovers_after_three_consecutive_accepts() -> None:
    guard = FdPressureGuard()
    guard.on_accept_error(FD)
    assert guard.on_accept_ok() is False
    assert guard.on_accept_ok() is False
    assert guard.streak == 2
    assert guard.demoted
    assert guard.on_accept_ok() is True
    assert not guard.demoted
    assert guard.streak == 0


def test_an_error_resets_the_recovery_streak() -> None:
    guard = FdPressureGuard()
    guard.on_accept_error(FD)
    guard.on_accept_ok()
    guard.on_accept_ok()
    guard.on_accept_error(FD)
    assert guard.streak == 0
    guard.on_accept_ok()
    guard.on_accept_ok()
    assert guard.demoted
    assert guard.on_accept_ok() is True


def test_healthy_accepts_do_nothing() -> None:
    guard = FdPressureGuard()
    for _ in range(5):
        assert guard.on_accept_ok() is False
    assert guard.streak == 0
    assert not guard.demoted


def test_a_new_episode_after_recovery_is_counted_and_flagged() -> None:
    guard = FdPressureGuard(recovery_accepts=1)
    guard.on_accept_error(FD)
    guard.on_accept_ok()
    assert guard.on_accept_error(FD).first_demotion
    assert guard.episodes == 2


def test_refusal_code_reason_and_retry_after() -> None:
    guard = FdPressureGuard()
    guard.on_accept_error(FD)
    refusal = guard.refusal()
    assert refusal == Refusal(
        RefusalCode.FD_PRESSURE, "broker is low on file descriptors; retry shortly", 1000
    )
    assert int(refusal.code) == 9
    guard.refusal()
    assert guard.refusals == 2


def test_zero_configuration_clamps() -> None:
    guard = FdPressureGuard(recovery_accepts=0, retry_after_s=0.0, backoff_s=-1.0)
    assert guard.recovery_accepts == 1
    assert guard.refusal().retry_after_ms == 1
    assert guard.on_accept_error(FD).backoff_s == 0.001


def test_status_is_json_ready() -> None:
    guard = FdPressureGuard()
    guard.on_accept_error(FD)
    guard.refusal()
    assert guard.status() == {
        "demoted": True,
        "episodes": 1,
        "refusals": 1,
        "exhaustion_errors": 1,
    }


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is Unix-only")
def test_real_emfile_from_lowered_rlimit_is_classified_as_fd_exhaustion() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened: list[int] = []
    base = os.open(os.devnull, os.O_RDONLY)
    opened.append(base)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (base + 8, hard))
        with pytest.raises(OSError) as info:
            for _ in range(64):
                opened.append(os.dup(base))
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert classify_accept_error(info.value) is FD
    guard = FdPressureGuard()
    assert guard.on_accept_error(classify_accept_error(info.value)).first_demotion
