"""Spawn budget and spawn-wait decisions (facts §6)."""

from __future__ import annotations

import pytest

from rpbroker.policy.spawn_budget import (
    DEFAULT_SPAWN_ATTEMPTS,
    DEFAULT_SPAWN_WINDOW_S,
    SPAWN_IN_PROGRESS,
    BudgetExhausted,
    BudgetSnapshot,
    SpawnBudget,
    SpawnInProgress,
    SpawnOutcome,
    SpawnPermit,
)
from rpbroker.policy.spawn_wait import (
    DEFAULT_SPAWN_WAIT_BACKOFF_S,
    DEFAULT_SPAWN_WAIT_CEILING_S,
    DaemonExitedBeforeReady,
    EndpointReady,
    SleepFor,
    SpawnWaitPolicy,
    SpawnWaitTimeout,
)

A = ("shared", "zccache", "1.0.0")
B = ("shared", "zccache", "2.0.0")


def fail(budget: SpawnBudget, key: object, now: float) -> None:
    decision = budget.try_begin(key, now)
    assert isinstance(decision, SpawnPermit)
    budget.finish(key, SpawnOutcome.FAILED, now)


# -- spawn budget -----------------------------------------------------------------------


def test_default_budget_is_three_attempts_per_thirty_seconds() -> None:
    assert (DEFAULT_SPAWN_ATTEMPTS, DEFAULT_SPAWN_WINDOW_S) == (3, 30.0)
    budget = SpawnBudget()
    for n in (1, 2, 3):
        assert budget.try_begin(A, 0.0) == SpawnPermit(attempt_number=n, remaining=3 - n)
        budget.finish(A, SpawnOutcome.FAILED, 0.0)
    assert isinstance(budget.try_begin(A, 0.0), BudgetExhausted)


def test_zero_configuration_clamps() -> None:
    budget = SpawnBudget(0, 0.0)
    assert (budget.max_attempts, budget.window_s) == (1, 0.001)


def test_spawn_budget_exhaustion_is_per_backend_key() -> None:
    budget = SpawnBudget(2, 10.0)
    fail(budget, A, 0.0)
    fail(budget, A, 0.0)
    exhausted = budget.try_begin(A, 0.0)
    assert exhausted == BudgetExhausted(retry_after_s=10.0, storm_trip=True)
    assert isinstance(budget.try_begin(B, 0.0), SpawnPermit)


def test_retry_after_is_rest_of_window() -> None:
    budget = SpawnBudget(1, 10.0)
    fail(budget, A, 0.0)
    decision = budget.try_begin(A, 3.0)
    assert isinstance(decision, BudgetExhausted)
    assert decision.retry_after_s == 7.0
    assert decision.retry_after_ms == 7000


def test_single_flight_blocks_duplicate_spawn_for_same_key() -> None:
    budget = SpawnBudget()
    assert isinstance(budget.try_begin(A, 0.0), SpawnPermit)
    assert budget.try_begin(A, 0.1) is SPAWN_IN_PROGRESS
    assert budget.try_begin(A, 0.1) == SpawnInProgress()
    assert isinstance(budget.try_begin(B, 0.1), SpawnPermit)
    # In-progress checks do not consume budget.
    assert budget.snapshot(A, 0.1).attempts_used == 1


def test_in_flight_wins_over_exhausted() -> None:
    budget = SpawnBudget(1, 10.0)
    budget.try_begin(A, 0.0)
    assert budget.try_begin(A, 1.0) is SPAWN_IN_PROGRESS


def test_storm_trip_signals_exactly_once_per_window_then_on_success_reset() -> None:
    budget = SpawnBudget(1, 10.0)
    fail(budget, A, 0.0)
    first = budget.try_begin(A, 1.0)
    second = budget.try_begin(A, 2.0)
    assert isinstance(first, BudgetExhausted) and first.storm_trip
    assert isinstance(second, BudgetExhausted) and not second.storm_trip
    # A new window trips again, once.
    fail(budget, A, 10.0)
    third = budget.try_begin(A, 11.0)
    assert isinstance(third, BudgetExhausted) and third.storm_trip
    assert not budget.try_begin(A, 12.0).storm_trip  # type: ignore[union-attr]


def test_storm_trip_rearms_after_success() -> None:
    budget = SpawnBudget(1, 100.0)
    budget.try_begin(A, 0.0)
    budget.finish(A, SpawnOutcome.SUCCEEDED, 1.0)
    fail(budget, A, 2.0)
    tripped = budget.try_begin(A, 3.0)
    assert isinstance(tripped, BudgetExhausted) and tripped.storm_trip


def test_cooldown_resets_spawn_budget() -> None:
    budget = SpawnBudget(1, 10.0)
    fail(budget, A, 0.0)
    assert isinstance(budget.try_begin(A, 9.999), BudgetExhausted)
    assert budget.try_begin(A, 10.0) == SpawnPermit(1, 0)


def test_finishing_success_resets_failure_budget() -> None:
    budget = SpawnBudget(3, 30.0)
    fail(budget, A, 0.0)
    budget.try_begin(A, 1.0)
    budget.finish(A, SpawnOutcome.SUCCEEDED, 2.0)
    assert budget.snapshot(A, 2.0) == BudgetSnapshot(0, 3, False, None)
    budget.try_begin(A, 3.0)
    assert budget.snapshot(A, 3.0) == BudgetSnapshot(1, 2, True, None)


def test_failure_keeps_budget_consumed() -> None:
    budget = SpawnBudget(3, 30.0)
    fail(budget, A, 0.0)
    assert budget.snapshot(A, 1.0) == BudgetSnapshot(1, 2, False, None)


def test_snapshot_reports_retry_after_when_budget_is_empty() -> None:
    budget = SpawnBudget(1, 10.0)
    fail(budget, A, 0.0)
    assert budget.snapshot(A, 3.0) == BudgetSnapshot(1, 0, False, 7.0)


def test_snapshot_of_unknown_or_rolled_over_key() -> None:
    budget = SpawnBudget(2, 10.0)
    assert budget.snapshot(A, 0.0) == BudgetSnapshot(0, 2, False, None)
    fail(budget, A, 0.0)
    assert budget.snapshot(A, 10.0) == BudgetSnapshot(0, 2, False, None)
    # snapshot is read-only: the key is still known and unchanged.
    assert budget.keys() == [A]


def test_stuck_in_flight_is_cleared_at_window_rollover() -> None:
    budget = SpawnBudget(3, 10.0)
    budget.try_begin(A, 0.0)  # never finished
    assert budget.try_begin(A, 9.0) is SPAWN_IN_PROGRESS
    assert budget.try_begin(A, 10.0) == SpawnPermit(1, 2)


def test_finish_of_unknown_key_is_ignored() -> None:
    budget = SpawnBudget()
    budget.finish(A, SpawnOutcome.SUCCEEDED, 0.0)
    assert budget.keys() == []


def test_keys_and_forget() -> None:
    budget = SpawnBudget()
    budget.try_begin(A, 0.0)
    budget.try_begin(B, 0.0)
    assert budget.keys() == [A, B]
    assert budget.forget(A) is True
    assert budget.forget(A) is False
    assert budget.keys() == [B]


def test_distinct_version_flood_gets_one_attempt_each() -> None:
    budget = SpawnBudget(1, 10.0)
    for i in range(16):
        key = ("svc", f"1.0.{i}")
        assert isinstance(budget.try_begin(key, 0.0), SpawnPermit)
        budget.finish(key, SpawnOutcome.FAILED, 0.0)
        assert isinstance(budget.try_begin(key, 0.0), BudgetExhausted)


# -- spawn wait -------------------------------------------------------------------------


def test_default_hard_ceiling_is_sixty_seconds() -> None:
    assert DEFAULT_SPAWN_WAIT_CEILING_S == 60.0
    assert SpawnWaitPolicy().ceiling_s == 60.0
    assert DEFAULT_SPAWN_WAIT_BACKOFF_S == (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def test_timeout_is_hard_bounded_not_infinite() -> None:
    policy = SpawnWaitPolicy(ceiling_s=0.125)
    decision = policy.decide(0.100, daemon_alive=True, endpoint_ready=False, attempt=5)
    assert isinstance(decision, SleepFor)
    assert decision.delay_s == pytest.approx(0.025)
    assert policy.decide(0.125, True, False, 5) == SpawnWaitTimeout(0.125)
    assert policy.decide(99.0, True, False, 0) == SpawnWaitTimeout(0.125)


def test_dead_process_returns_daemon_exited_before_ready() -> None:
    policy = SpawnWaitPolicy()
    assert policy.decide(0.0, False, False, 0) == DaemonExitedBeforeReady()
    # Dead wins over the ceiling.
    assert policy.decide(999.0, False, False, 0) == DaemonExitedBeforeReady()


def test_endpoint_ready_wins() -> None:
    policy = SpawnWaitPolicy(ceiling_s=0.001)
    assert policy.decide(30.0, daemon_alive=False, endpoint_ready=True, attempt=0) == (
        EndpointReady()
    )


def test_backoff_sequence_and_cap_match_spawn_wait_contract() -> None:
    policy = SpawnWaitPolicy()
    delays = [policy.decide(0.0, True, False, n) for n in range(8)]
    assert delays == [SleepFor(d) for d in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 2.0, 2.0)]
    assert policy.decide(0.0, True, False, 999) == SleepFor(2.0)
    assert policy.decide(0.0, True, False, -3) == SleepFor(0.05)


def test_custom_backoff_and_clamping() -> None:
    policy = SpawnWaitPolicy(ceiling_s=0.0, backoff=(0.0, 1.0))
    assert policy.ceiling_s == 0.001
    assert policy.backoff == (0.001, 1.0)
    assert policy.backoff_for(7) == 1.0
    with pytest.raises(ValueError):
        SpawnWaitPolicy(backoff=())
