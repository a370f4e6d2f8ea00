"""Spawn budget, the per-service spawn cap, the readiness back-off of foreign backends (§6)."""

from __future__ import annotations

import pytest

from rpbroker.policy.spawn_budget import (
    DEFAULT_SERVICE_SPAWN_ATTEMPTS,
    DEFAULT_SPAWN_ATTEMPTS,
    DEFAULT_SPAWN_WINDOW_S,
    SPAWN_IN_PROGRESS,
    BudgetExhausted,
    BudgetSnapshot,
    SpawnBudget,
    SpawnInProgress,
    SpawnLimiter,
    SpawnOutcome,
    SpawnPermit,
)
from rpbroker.policy.spawn_wait import DEFAULT_SPAWN_WAIT_BACKOFF_S, ReadinessBackoff

Key = tuple[str, str, str]
A: Key = ("shared", "zccache", "1.0.0")
B: Key = ("shared", "zccache", "2.0.0")


def fail(budget: SpawnBudget[Key], key: Key, now: float) -> None:
    decision = budget.try_begin(key, now)
    assert isinstance(decision, SpawnPermit)
    budget.finish(key, SpawnOutcome.FAILED, now)


# -- spawn budget -----------------------------------------------------------------------


def test_default_budget_is_three_attempts_per_thirty_seconds() -> None:
    assert (DEFAULT_SPAWN_ATTEMPTS, DEFAULT_SPAWN_WINDOW_S) == (3, 30.0)
    budget = SpawnBudget[Key]()
    for n in (1, 2, 3):
        assert budget.try_begin(A, 0.0) == SpawnPermit(attempt_number=n, remaining=3 - n)
        budget.finish(A, SpawnOutcome.FAILED, 0.0)
    assert budget.try_begin(A, 0.0) == BudgetExhausted(retry_after_s=30.0, storm_trip=True)


def test_zero_configuration_clamps() -> None:
    budget = SpawnBudget[Key](0, 0.0)
    assert budget.try_begin(A, 0.0) == SpawnPermit(1, 0)
    budget.finish(A, SpawnOutcome.FAILED, 0.0)
    assert budget.try_begin(A, 0.0005) == BudgetExhausted(retry_after_s=0.0005, storm_trip=True)
    assert budget.try_begin(A, 0.001) == SpawnPermit(1, 0)  # a 1 ms window


def test_spawn_budget_exhaustion_is_per_backend_key() -> None:
    budget = SpawnBudget[Key](2, 10.0)
    fail(budget, A, 0.0)
    fail(budget, A, 0.0)
    exhausted = budget.try_begin(A, 0.0)
    assert exhausted == BudgetExhausted(retry_after_s=10.0, storm_trip=True)
    assert isinstance(budget.try_begin(B, 0.0), SpawnPermit)


def test_retry_after_is_rest_of_window() -> None:
    budget = SpawnBudget[Key](1, 10.0)
    fail(budget, A, 0.0)
    decision = budget.try_begin(A, 3.0)
    assert isinstance(decision, BudgetExhausted)
    assert decision.retry_after_s == 7.0
    assert decision.retry_after_ms == 7000


def test_single_flight_blocks_duplicate_spawn_for_same_key() -> None:
    budget = SpawnBudget[Key]()
    assert isinstance(budget.try_begin(A, 0.0), SpawnPermit)
    assert budget.try_begin(A, 0.1) is SPAWN_IN_PROGRESS
    assert budget.try_begin(A, 0.1) == SpawnInProgress()
    assert isinstance(budget.try_begin(B, 0.1), SpawnPermit)
    # In-progress checks do not consume budget.
    assert budget.snapshot(A, 0.1).attempts_used == 1


def test_in_flight_wins_over_exhausted() -> None:
    budget = SpawnBudget[Key](1, 10.0)
    budget.try_begin(A, 0.0)
    assert budget.try_begin(A, 1.0) is SPAWN_IN_PROGRESS


def test_storm_trip_signals_exactly_once_per_window_then_on_success_reset() -> None:
    budget = SpawnBudget[Key](1, 10.0)
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
    budget = SpawnBudget[Key](1, 100.0)
    budget.try_begin(A, 0.0)
    budget.finish(A, SpawnOutcome.SUCCEEDED, 1.0)
    fail(budget, A, 2.0)
    tripped = budget.try_begin(A, 3.0)
    assert isinstance(tripped, BudgetExhausted) and tripped.storm_trip


def test_cooldown_resets_spawn_budget() -> None:
    budget = SpawnBudget[Key](1, 10.0)
    fail(budget, A, 0.0)
    assert isinstance(budget.try_begin(A, 9.999), BudgetExhausted)
    assert budget.try_begin(A, 10.0) == SpawnPermit(1, 0)


def test_finishing_success_resets_failure_budget() -> None:
    budget = SpawnBudget[Key](3, 30.0)
    fail(budget, A, 0.0)
    budget.try_begin(A, 1.0)
    budget.finish(A, SpawnOutcome.SUCCEEDED, 2.0)
    assert budget.snapshot(A, 2.0) == BudgetSnapshot(0, 3, False, None)
    budget.try_begin(A, 3.0)
    assert budget.snapshot(A, 3.0) == BudgetSnapshot(1, 2, True, None)


def test_failure_keeps_budget_consumed() -> None:
    budget = SpawnBudget[Key](3, 30.0)
    fail(budget, A, 0.0)
    assert budget.snapshot(A, 1.0) == BudgetSnapshot(1, 2, False, None)


def test_snapshot_reports_retry_after_when_budget_is_empty() -> None:
    budget = SpawnBudget[Key](1, 10.0)
    fail(budget, A, 0.0)
    assert budget.snapshot(A, 3.0) == BudgetSnapshot(1, 0, False, 7.0)


def test_snapshot_of_unknown_or_rolled_over_key() -> None:
    budget = SpawnBudget[Key](2, 10.0)
    assert budget.snapshot(A, 0.0) == BudgetSnapshot(0, 2, False, None)
    fail(budget, A, 0.0)
    assert budget.snapshot(A, 10.0) == BudgetSnapshot(0, 2, False, None)
    # snapshot is read-only: the key is still known and unchanged.
    assert budget.keys() == [A]


def test_stuck_in_flight_is_cleared_at_window_rollover() -> None:
    budget = SpawnBudget[Key](3, 10.0)
    budget.try_begin(A, 0.0)  # never finished
    assert budget.try_begin(A, 9.0) is SPAWN_IN_PROGRESS
    assert budget.try_begin(A, 10.0) == SpawnPermit(1, 2)


def test_finish_of_unknown_key_is_ignored() -> None:
    budget = SpawnBudget[Key]()
    budget.finish(A, SpawnOutcome.SUCCEEDED, 0.0)
    assert budget.keys() == []


def test_keys_in_first_seen_order() -> None:
    budget = SpawnBudget[Key]()
    budget.try_begin(B, 0.0)
    budget.try_begin(A, 0.0)
    budget.try_begin(B, 1.0)
    assert budget.keys() == [B, A]


def test_count_attempt_counts_without_marking_in_flight() -> None:
    budget = SpawnBudget[Key](2, 10.0)
    budget.count_attempt(A, 0.0)
    assert budget.snapshot(A, 0.0) == BudgetSnapshot(1, 1, False, None)
    budget.count_attempt(A, 1.0)
    assert budget.snapshot(A, 1.0) == BudgetSnapshot(2, 0, False, 9.0)
    assert budget.try_begin(A, 1.0) == BudgetExhausted(9.0, storm_trip=True)
    budget.count_attempt(A, 2.0)  # beyond the limit: still exhausted, never negative
    assert budget.snapshot(A, 2.0).remaining == 0
    # The window rolls over as usual.
    budget.count_attempt(A, 10.0)
    assert budget.snapshot(A, 10.0) == BudgetSnapshot(1, 1, False, None)


def test_distinct_version_flood_gets_one_attempt_each() -> None:
    budget = SpawnBudget[Key](1, 10.0)
    for i in range(16):
        key = ("shared", "svc", f"1.0.{i}")
        assert isinstance(budget.try_begin(key, 0.0), SpawnPermit)
        budget.finish(key, SpawnOutcome.FAILED, 0.0)
        assert isinstance(budget.try_begin(key, 0.0), BudgetExhausted)


# -- spawn limiter: per-key budget under a per-service cap ---------------------------------

Service = tuple[str, str]
SVC: Service = ("shared", "zccache")
OTHER: Service = ("shared", "other")


def version(i: int) -> Key:
    return ("shared", "zccache", f"1.0.{i}")


def test_default_service_cap_is_twice_the_key_budget() -> None:
    assert DEFAULT_SERVICE_SPAWN_ATTEMPTS == 2 * DEFAULT_SPAWN_ATTEMPTS == 6


def test_failing_service_gets_at_most_six_spawns_per_window_over_six_versions() -> None:
    limiter = SpawnLimiter[Key, Service]()
    permits: list[Key] = []
    refusals: list[BudgetExhausted] = []
    for i in range(6):
        for _ in range(4):
            decision = limiter.try_begin(version(i), SVC, 1.0)
            if isinstance(decision, SpawnPermit):
                permits.append(version(i))
                limiter.finish(version(i), SVC, SpawnOutcome.FAILED, 1.0)
            else:
                assert isinstance(decision, BudgetExhausted)
                refusals.append(decision)
    assert len(permits) == 6
    assert permits == [version(0)] * 3 + [version(1)] * 3
    assert len(refusals) == 6 * 4 - 6
    assert all(r.retry_after_s == 30.0 for r in refusals)
    # The next window allows spawns again (each version's own budget too).
    assert isinstance(limiter.try_begin(version(5), SVC, 31.0), SpawnPermit)


def test_service_cap_refusal_reports_its_window_and_trips_once() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=3, window_s=10.0, max_service_attempts=2)
    for i in range(2):
        assert isinstance(limiter.try_begin(version(i), SVC, float(i)), SpawnPermit)
        limiter.finish(version(i), SVC, SpawnOutcome.FAILED, float(i))
    assert limiter.try_begin(version(2), SVC, 4.0) == BudgetExhausted(6.0, storm_trip=True)
    assert limiter.try_begin(version(3), SVC, 5.0) == BudgetExhausted(5.0, storm_trip=False)
    # The service window started at its first spawn: it ends at 10.0.
    assert isinstance(limiter.try_begin(version(2), SVC, 10.0), SpawnPermit)


def test_service_cap_refusal_spends_no_key_budget() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=3, window_s=30.0, max_service_attempts=1)
    limiter.try_begin(version(0), SVC, 0.0)
    limiter.finish(version(0), SVC, SpawnOutcome.FAILED, 0.0)
    for _ in range(5):
        assert isinstance(limiter.try_begin(version(1), SVC, 1.0), BudgetExhausted)
    assert limiter.keys.snapshot(version(1), 1.0) == BudgetSnapshot(0, 3, False, None)


def test_key_refusal_spends_no_service_budget() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=1, window_s=30.0, max_service_attempts=2)
    assert isinstance(limiter.try_begin(version(0), SVC, 0.0), SpawnPermit)
    # In flight for the key: refused without counting against the service.
    assert limiter.try_begin(version(0), SVC, 0.1) is SPAWN_IN_PROGRESS
    limiter.finish(version(0), SVC, SpawnOutcome.FAILED, 0.2)
    # Exhausted for the key: refused without counting against the service either.
    for _ in range(5):
        assert isinstance(limiter.try_begin(version(0), SVC, 0.3), BudgetExhausted)
    # So the service still has its second attempt, and only that one.
    assert isinstance(limiter.try_begin(version(1), SVC, 0.4), SpawnPermit)
    limiter.finish(version(1), SVC, SpawnOutcome.FAILED, 0.4)
    assert isinstance(limiter.try_begin(version(2), SVC, 0.5), BudgetExhausted)


def test_key_budget_still_applies_under_the_cap() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=2, window_s=30.0, max_service_attempts=10)
    for _ in range(2):
        assert isinstance(limiter.try_begin(A, SVC, 0.0), SpawnPermit)
        limiter.finish(A, SVC, SpawnOutcome.FAILED, 0.0)
    assert limiter.try_begin(A, SVC, 0.0) == BudgetExhausted(30.0, storm_trip=True)
    assert limiter.keys.snapshot(A, 0.0) == BudgetSnapshot(2, 0, False, 30.0)


def test_success_resets_the_key_and_the_service() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=3, window_s=30.0, max_service_attempts=6)
    for _ in range(3):
        limiter.try_begin(version(0), SVC, 0.0)
        limiter.finish(version(0), SVC, SpawnOutcome.FAILED, 0.0)
    for _ in range(2):
        limiter.try_begin(version(1), SVC, 1.0)
        limiter.finish(version(1), SVC, SpawnOutcome.FAILED, 1.0)
    assert isinstance(limiter.try_begin(version(1), SVC, 2.0), SpawnPermit)  # the 6th
    assert isinstance(limiter.try_begin(version(2), SVC, 2.0), BudgetExhausted)
    limiter.finish(version(1), SVC, SpawnOutcome.SUCCEEDED, 3.0)
    assert limiter.keys.snapshot(version(1), 3.0) == BudgetSnapshot(0, 3, False, None)
    # The service cap is reset: another version may spawn ...
    assert isinstance(limiter.try_begin(version(2), SVC, 4.0), SpawnPermit)
    # ... but a key's own failures are not forgiven by another key's success.
    assert isinstance(limiter.try_begin(version(0), SVC, 4.0), BudgetExhausted)


def test_services_are_capped_independently() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=3, window_s=30.0, max_service_attempts=1)
    limiter.try_begin(version(0), SVC, 0.0)
    limiter.finish(version(0), SVC, SpawnOutcome.FAILED, 0.0)
    assert isinstance(limiter.try_begin(version(1), SVC, 0.0), BudgetExhausted)
    assert isinstance(limiter.try_begin(("shared", "other", "1.0.0"), OTHER, 0.0), SpawnPermit)


def test_limiter_zero_configuration_clamps() -> None:
    limiter = SpawnLimiter[Key, Service](max_attempts=0, window_s=0.0, max_service_attempts=0)
    assert limiter.try_begin(A, SVC, 0.0) == SpawnPermit(1, 0)
    limiter.finish(A, SVC, SpawnOutcome.FAILED, 0.0)
    assert isinstance(limiter.try_begin(B, SVC, 0.0), BudgetExhausted)  # one per service
    assert isinstance(limiter.try_begin(B, SVC, 0.001), SpawnPermit)  # a 1 ms window


# -- spawn wait (readiness checks of a foreign backend) -----------------------------------


def test_backoff_sequence_and_cap() -> None:
    assert DEFAULT_SPAWN_WAIT_BACKOFF_S == (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    backoff = ReadinessBackoff()
    delays = [backoff.step_after(n) for n in range(1, 9)]
    assert delays == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert backoff.step_after(999) == 2.0
    assert backoff.step_after(-3) == 0.05


def test_next_check_never_passes_the_deadline() -> None:
    backoff = ReadinessBackoff()
    assert backoff.next_check_at(1, now=10.0, deadline=20.0) == pytest.approx(10.05)
    assert backoff.next_check_at(6, now=10.0, deadline=11.0) == 11.0  # step 2 s, capped
    assert backoff.next_check_at(6, now=12.0, deadline=11.0) == 12.0  # past it: at once


def test_custom_backoff_and_clamping() -> None:
    backoff = ReadinessBackoff(steps=(0.0, 1.0))
    assert backoff.steps == (0.001, 1.0)
    assert backoff.step_after(7) == 1.0
    with pytest.raises(ValueError):
        ReadinessBackoff(steps=())
