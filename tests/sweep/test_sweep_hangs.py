"""Hangs: every run is bounded, a stuck run is reported with its stacks, the test goes on."""

from __future__ import annotations

import threading

import trio

from rpbroker.testing import RunHung, SweepEnd, Unwinding, sweep_cancellation

from .support import line_of


async def shielded_cleanup_that_never_ends() -> None:
    try:
        await trio.sleep(1)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await trio.Event().wait()  # nobody ever sets it
        raise


async def test_a_shielded_wait_after_the_cut_is_reported_as_hung_with_its_stack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await sweep_cancellation(shielded_cleanup_that_never_ends)
    failure = report.first_failure
    assert failure is not None and failure.cut_at == 1
    hung = failure.outcome
    assert isinstance(hung, RunHung)
    assert hung.unwinding is Unwinding.AFTER_LIFTING_SHIELDS
    (task,) = hung.tasks
    assert task.where is not None
    assert task.where.lineno == line_of(shielded_cleanup_that_never_ends, "nobody ever sets it")
    text = report.describe()
    assert "FAILED at run k=1" in text
    assert "hung: still running at its bound" in text
    assert "ended only after the sweep lifted its cancel shields" in text


async def test_a_target_that_never_ends_uncut_hangs_in_the_warm_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def waits_for_nothing() -> None:
        await trio.Event().wait()

    report = await sweep_cancellation(waits_for_nothing, run_timeout_s=60)
    assert report.end is SweepEnd.FAILED
    failure = report.first_failure
    assert failure is not None and failure.cut_at is None
    assert isinstance(failure.outcome, RunHung)
    assert failure.outcome.bound_s == 60
    assert failure.outcome.unwinding is Unwinding.AFTER_CANCEL


async def test_a_hang_on_the_real_clock_is_bounded_by_run_timeout() -> None:
    with trio.fail_after(10):
        report = await sweep_cancellation(shielded_cleanup_that_never_ends, run_timeout_s=0.2)
    failure = report.first_failure
    assert failure is not None and isinstance(failure.outcome, RunHung)
    assert failure.outcome.unwinding is Unwinding.AFTER_LIFTING_SHIELDS


async def test_a_run_stuck_outside_trio_is_reported_and_the_sweep_returns() -> None:
    # The real clock: under MockClock a virtual bound would expire while the real
    # thread finishes, so the wait for it at the end could not be bounded.
    release = threading.Event()
    returned = trio.Event()

    async def stuck_in_a_thread() -> None:
        # Not abandoned on cancel, and no shield to lift: no cancellation reaches it.
        await trio.to_thread.run_sync(release.wait, abandon_on_cancel=False)
        returned.set()

    with trio.fail_after(10):
        report = await sweep_cancellation(stuck_in_a_thread, run_timeout_s=0.2)
    failure = report.first_failure
    assert failure is not None and failure.cut_at is None
    assert isinstance(failure.outcome, RunHung)
    assert failure.outcome.unwinding is Unwinding.NEVER
    assert "trio.run cannot finish" in report.describe()
    # The documented limit: only the test can free it; then the run ends.
    release.set()
    with trio.fail_after(10):
        await returned.wait()


async def test_cancelling_the_sweep_cancels_the_current_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    unwound = trio.Event()

    async def long_sleep() -> None:
        try:
            await trio.sleep(3600)
        finally:
            unwound.set()

    with trio.move_on_after(10) as scope:
        await sweep_cancellation(long_sleep)
    assert scope.cancelled_caught
    assert unwound.is_set()
