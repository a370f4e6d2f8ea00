"""The sweep against toy targets on ``MockClock(autojump_threshold=0)``.

Each toy target's number of steps is known: a target's first step runs until its
first blocking ``await``, and each wake-up is one more step, so ``n`` sleeps make
``n + 1`` steps. Every sleep is an abortable wait, so a cut after step ``k``
lands in the ``k``-th sleep.
"""

from __future__ import annotations

import socket

import pytest
import trio

from rpbroker.testing import (
    BrokenInvariant,
    BuiltinChecks,
    CountedTasks,
    LeakedFd,
    LeakedTask,
    OutcomeKind,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunRaisedAllowed,
    SampleSteps,
    SweepEnd,
    assert_sweep_clean,
    sweep_cancellation,
)

from .support import line_of


async def three_sleeps() -> None:
    await trio.sleep(1)  # sleep 1
    await trio.sleep(1)  # sleep 2
    await trio.sleep(1)  # sleep 3


async def test_a_clean_target_is_cut_at_every_step_until_it_completes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await assert_sweep_clean(three_sleeps)
    assert report.total_steps == 4
    # k=4 is the step the target returns in: no cut is made after it, so that run
    # completes uncancelled and ends the sweep.
    assert [run.cut_at for run in report.runs] == [None, 1, 2, 3, 4]
    assert report.totals() == {OutcomeKind.COMPLETED: 2, OutcomeKind.CANCELLED: 3}
    for k in (1, 2, 3):
        run = report.runs[k]
        assert isinstance(run.outcome, RunCancelled)
        assert run.outcome.where is not None
        assert run.outcome.where.lineno == line_of(three_sleeps, f"# sleep {k}")
        assert run.landing is not None and run.landing.task.where is not None
        assert run.landing.task.where.lineno == line_of(three_sleeps, f"# sleep {k}")
    assert report.runs[4].landing is None
    assert "clean; the target takes 4 steps uncancelled" in report.describe()


HELD: list[tuple[socket.socket, socket.socket]] = []


async def leaks_a_socket_pair_when_cut_at_step_3() -> None:
    await trio.sleep(1)
    await trio.sleep(1)
    pair = socket.socketpair()
    HELD.append(pair)  # kept alive, as a real leak would be
    await trio.sleep(1)  # the third step ends here
    for sock in pair:
        sock.close()
    await trio.sleep(1)


async def test_a_descriptor_leaked_only_at_step_3_is_reported_with_k_and_the_fd(
    autojump_clock: trio.testing.MockClock,
) -> None:
    try:
        report = await sweep_cancellation(leaks_a_socket_pair_when_cut_at_step_3)
        (fds,) = [(a.fileno(), b.fileno()) for a, b in HELD if a.fileno() >= 0]
    finally:
        for a, b in HELD:
            a.close()
            b.close()
        HELD.clear()
    assert report.end is SweepEnd.FAILED
    failure = report.first_failure
    assert failure is not None and failure.cut_at == 3
    assert isinstance(failure.outcome, RunCancelled)
    leaked = [leak for leak in failure.leaks if isinstance(leak, LeakedFd)]
    assert {leak.fd for leak in leaked} == set(fds)
    assert all(leak.target.startswith("socket:[") for leak in leaked)
    text = report.describe()
    assert "FAILED at run k=3" in text
    marked = line_of(leaks_a_socket_pair_when_cut_at_step_3, "the third step ends here")
    assert f"test_sweep_mockclock.py:{marked} (leaks_a_socket_pair_when_cut_at_step_3)" in text
    assert f"descriptor {fds[0]} -> socket:[" in text
    with pytest.raises(AssertionError, match="FAILED at run k=3"):
        report.raise_for_failure()


async def test_only_the_requested_builtin_checks_are_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    try:
        report = await assert_sweep_clean(
            leaks_a_socket_pair_when_cut_at_step_3, checks=BuiltinChecks.TASKS
        )
    finally:
        for a, b in HELD:
            a.close()
            b.close()
        HELD.clear()
    assert report.total_steps == 5
    assert report.unchecked is BuiltinChecks.NONE


async def test_a_task_left_running_in_an_outer_nursery_is_a_leak(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def helper(stop: trio.Event) -> None:
        await stop.wait()  # the helper waits here

    async def starts_a_helper(nursery: trio.Nursery) -> None:
        stop = trio.Event()
        nursery.start_soon(helper, stop)
        await trio.sleep(1)  # a cut here forgets to stop the helper
        stop.set()

    async with trio.open_nursery() as nursery:
        report = await sweep_cancellation(starts_a_helper, nursery)
        nursery.cancel_scope.cancel()
    failure = report.first_failure
    assert failure is not None and failure.cut_at == 1
    (leak,) = failure.leaks
    assert isinstance(leak, LeakedTask)
    assert leak.task.name.endswith("helper")
    assert leak.task.where is not None
    assert leak.task.where.lineno == line_of(helper, "the helper waits here")


async def test_a_group_of_only_cancelled_counts_as_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def wraps_cancelled() -> None:
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            raise BaseExceptionGroup("cleanup wrapped it", [exc]) from None

    async def nursery_of_sleepers() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(trio.sleep, 1)

    wrapped = await assert_sweep_clean(wraps_cancelled)
    assert isinstance(wrapped.runs[1].outcome, RunCancelled)
    children = await assert_sweep_clean(nursery_of_sleepers, counted=CountedTasks.WHOLE_RUN)
    assert children.totals()[OutcomeKind.CANCELLED] >= 1


async def test_an_error_beside_cancelled_fails_unless_allowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def converts_cancelled() -> None:
        try:
            await trio.sleep(1)
        except trio.Cancelled:
            raise LookupError("turned a cancellation into an error") from None

    report = await sweep_cancellation(converts_cancelled)
    failure = report.first_failure
    assert failure is not None and failure.cut_at == 1
    assert isinstance(failure.outcome, RunFailed)
    assert "raised LookupError, which is not allowed" in report.describe()
    assert "turned a cancellation into an error" in report.describe()
    allowed = await assert_sweep_clean(converts_cancelled, allowed_errors=(LookupError,))
    assert isinstance(allowed.runs[1].outcome, RunRaisedAllowed)


async def test_a_cut_after_the_last_checkpoint_lets_the_target_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def ends_with_a_schedule_point() -> None:
        await trio.sleep(1)
        # A shielded schedule point (as at the end of a successful I/O call): the cut
        # comes while it is already rescheduled, and no checkpoint follows.
        await trio.lowlevel.cancel_shielded_checkpoint()

    report = await assert_sweep_clean(ends_with_a_schedule_point)
    assert report.total_steps == 3
    cut_late = report.runs[2]
    assert cut_late.cut_at == 2 and isinstance(cut_late.outcome, RunCompleted)
    assert cut_late.outcome.cancel_issued
    assert report.totals()[OutcomeKind.COMPLETED_AFTER_CUT] == 1


async def test_sleeps_take_virtual_time_only(autojump_clock: trio.testing.MockClock) -> None:
    async def long_sleeps() -> None:
        for _ in range(5):
            await trio.sleep(3600)

    start = trio.current_time()
    report = await assert_sweep_clean(long_sleeps)
    assert report.total_steps == 6
    # Warm-up 5 h, then cuts after 1..6 steps: 0+1+2+3+4+5 h of sleeping.
    assert trio.current_time() - start == pytest.approx(3600 * (5 + 15))


async def test_sampling_cuts_every_step_up_to_n_then_every_stride(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def twenty_nine_sleeps() -> None:
        for _ in range(29):
            await trio.sleep(1)

    report = await assert_sweep_clean(
        twenty_nine_sleeps, steps=SampleSteps(every_up_to=5, stride=10)
    )
    assert [run.cut_at for run in report.cut_runs] == [1, 2, 3, 4, 5, 15, 25, 35]
    assert report.total_steps == 30


async def test_a_target_longer_than_max_steps_is_reported_incomplete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await sweep_cancellation(three_sleeps, steps=SampleSteps(max_steps=2))
    assert report.end is SweepEnd.STEP_LIMIT
    assert not report.ok and report.first_failure is None
    assert "INCOMPLETE: still running after 2 steps" in report.describe()


async def test_counted_tasks_select_whose_steps_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def parent_and_child() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(three_sleeps)
            await trio.sleep(10)

    async def ticker() -> None:
        while True:
            await trio.sleep(0.5)

    own = await assert_sweep_clean(parent_and_child, counted=CountedTasks.TARGET_TASK)
    whole = await assert_sweep_clean(parent_and_child, counted=CountedTasks.WHOLE_RUN)
    # The parent: up to its sleep, the wake-up, the nursery's exit. The child: 4 more.
    assert (own.total_steps, whole.total_steps) == (3, 7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)  # an unrelated task of the test: not in the run
        noisy = await assert_sweep_clean(parent_and_child, counted=CountedTasks.WHOLE_RUN)
        every = await assert_sweep_clean(parent_and_child, counted=CountedTasks.EVERY_TASK)
        nursery.cancel_scope.cancel()
    assert noisy.total_steps == 7
    # EVERY_TASK counts the ticker too (20 wake-ups in 10 s), but cuts only the target.
    assert every.total_steps is not None and every.total_steps >= 7 + 20
    landed_in = {run.landing.task.name for run in every.cut_runs if run.landing is not None}
    assert any(name.endswith("ticker") for name in landed_in)


async def test_caller_invariants_prepare_and_settle(autojump_clock: trio.testing.MockClock) -> None:
    registry: set[str] = set()
    prepared: list[int] = []
    settled: list[int] = []

    def registry_is_empty() -> None:
        assert not registry, f"still registered: {sorted(registry)}"

    async def registers() -> None:
        registry.add("conn")
        await trio.sleep(1)
        registry.discard("conn")

    async def prepare() -> None:
        prepared.append(len(prepared))

    async def settle() -> None:
        settled.append(len(settled))

    report = await sweep_cancellation(
        registers, invariants=[registry_is_empty], prepare=prepare, settle=settle
    )
    failure = report.first_failure
    assert failure is not None and failure.cut_at == 1
    (broken,) = failure.leaks
    assert isinstance(broken, BrokenInvariant)
    assert broken.name == "test_caller_invariants_prepare_and_settle.<locals>.registry_is_empty"
    assert broken.message.startswith("still registered: ['conn']")
    assert len(prepared) == 2  # before the warm-up and before k=1
    assert settled  # awaited while settling
    assert isinstance(report.runs[0].outcome, RunCompleted)
