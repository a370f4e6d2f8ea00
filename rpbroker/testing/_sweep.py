"""Cancellation sweeps: cancel a piece of async code at every step and check what it leaves.

What this module does
---------------------
``sweep_cancellation(target, *args)`` runs ``target(*args)`` once uncancelled
(a warm-up, so lazily created long-lived resources are not counted as leaks),
then again and again, cutting run ``k`` after its ``k``-th counted scheduler
step, for ``k = 1, 2, ...`` (or a ``SampleSteps`` sample) until a run finishes
before its cut. After every run it waits for the world to settle and then checks
that nothing was left behind: descriptors of this process, unreaped child
processes, tasks the run started, and the caller's own invariants. It stops at
the first run that fails and returns a ``SweepReport``;
``assert_sweep_clean`` raises its text as an ``AssertionError``.

Each run's end is classified: completed, cancelled (``trio.Cancelled`` or an
exception group holding only ``Cancelled``), an error the caller allows
(``allowed_errors``; with or without ``Cancelled`` beside it), or a failure (any
other exception, ``Cancelled`` although no cut was made, a hang).

Design
------
- Counting: a ``trio.abc.Instrument`` (``StepCutter``) is added for each run,
  before the target's task exists, and removed after it. Its
  ``before_task_step`` counts steps of the target's task (``CountedTasks.TARGET_TASK``),
  of every task of the run (``CountedTasks.WHOLE_RUN``: tasks started while the
  run was going by a task already counted, or into one of their nurseries), or of
  every task but the sweep's (``CountedTasks.EVERY_TASK``: to cut a client while
  an in-process server is at each of its steps); its
  ``after_task_step`` cancels the target's scope when the k-th counted step ends
  (why that is safe, and where the cancel lands: see ``_sweep_instrument``).
  Prior art: trio's issue #77 ("a test helper for systematically injecting
  cancellations", open since 2017) proposes exactly this and suggests an
  instrument hook; ``trio.testing`` offers ``assert_checkpoints`` and
  ``wait_all_tasks_blocked`` but no injector; hypothesis-trio drives stateful
  tests, not cancellation; the Rust runtime asupersync documents cancellation
  injection at every await point. None of these checks leaks.
- Isolation: the target runs in a trio *system task*
  (``trio.lowlevel.spawn_system_task``, with a copy of the caller's context
  variables), inside two cancel scopes: the target's (cut by the instrument) and
  the run's (cancelled by the watchdog). A system task is nobody's child, so the
  sweep can give up on a run that never ends and still return.
- Bounds: the sweep's own task watches each run with ``trio.move_on_after(run_timeout_s)``,
  outside both scopes, so even a wait shielded from every cancellation is
  caught. On a hang it records every task of the run with its stack, cancels
  the run, waits ``HANG_GRACE_S`` (at most ``run_timeout_s``), then lifts the
  cancel shields of the run's tasks (``_sweep_tasks.lift_shields``) and waits
  once more. A run that still does not
  end (blocked in a thread or in C, or shielded where no scope can be found) is
  reported as never unwound: the sweep returns, the assertion fails at once,
  but that task stays and ``trio.run`` cannot finish: that is the limit.
  The bounds are on trio's clock: virtual under ``MockClock``, real otherwise.
- Settling: after a run, cleanup may legitimately finish a few checkpoints
  later (a child reaped by another task, a peer closing its end). The sweep
  repeats, up to ``settle_rounds`` times: wait until every other task has been
  blocked for ``SETTLE_QUIET_S`` of *real* time (``trio.testing.wait_all_tasks_blocked``
  with a cushion: any I/O, such as a child's exit, restarts the quiet period),
  then await the caller's ``settle`` (for instance ``broker.wait_connections_closed``),
  then check. Under ``MockClock`` this never advances virtual time (a task in
  ``wait_all_tasks_blocked`` suppresses autojump), so cleanup that waits on a
  virtual timer is only waited for if the caller's ``settle`` waits for it; on
  a real clock the same rounds give real I/O at least ``settle_rounds`` quiet
  periods to arrive. Nothing sleeps.
- Step counts vary: with real I/O a wait may or may not block, and scheduling
  order is random, so step k is not the same line from one run to the next.
  ``k`` is an index; the report says where each cut landed.

What it does not do
-------------------
- Cancel anything but the target: tasks the test started before the sweep (a
  broker, a server) are never cut, and their steps are never counted.
- Check other processes (a leaked descriptor inside a backend process), or
  memory. Leaks are checked between runs, not during them.
- Reclaim a task stuck outside trio's reach (see Bounds).
- Make step counts deterministic.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import TypedDict, TypeVarTuple, Unpack

import attrs
import trio
import trio.testing

from ._sweep_instrument import StepCutter
from ._sweep_leaks import (
    BuiltinChecks,
    Invariant,
    Leak,
    ProcessSnapshot,
    find_leaks,
    take_snapshot,
    unavailable_checks,
)
from ._sweep_report import (
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunHung,
    RunOutcome,
    RunRaisedAllowed,
    RunResult,
    SweepEnd,
    SweepReport,
    Unwinding,
)
from ._sweep_steps import EVERY_STEP, CountedTasks, SampleSteps, SweepUsageError
from ._sweep_tasks import lift_shields, task_stack, tasks_under, traceback_stack

PosArgsT = TypeVarTuple("PosArgsT")

#: Bound on one run on a real clock, seconds: a connect to a local broker takes
#: milliseconds; 10 s leaves room for a loaded two-core test machine while a
#: hang still fails long before a CI job's timeout.
DEFAULT_RUN_TIMEOUT_S = 10.0
#: Bound on one run under ``MockClock``, virtual seconds (a week): autojump reaches
#: it at once when the run is stuck, so it costs nothing, and it must not cut
#: short targets that sleep through long virtual timeouts.
DEFAULT_VIRTUAL_RUN_TIMEOUT_S = 7 * 24 * 3600.0
#: After a hung run is cancelled (and again after its shields are lifted), how
#: long it may take to unwind, seconds on trio's clock, and never longer than the
#: run's own bound: cleanup of a cancelled local operation takes milliseconds.
HANG_GRACE_S = 5.0
#: Real seconds every other task must stay blocked before a settle round checks:
#: a local child's exit or a peer's close reaches trio well within a millisecond,
#: so 5 ms of nothing happening means this round has settled.
SETTLE_QUIET_S = 0.005
#: Settle rounds before a leftover counts as a leak: cleanup that needs more than
#: a few dozen quiet periods is not "a few checkpoints later" any more.
DEFAULT_SETTLE_ROUNDS = 40
#: Bound on settling after a run, seconds on trio's clock (the caller's
#: ``settle`` may wait for something that never happens).
DEFAULT_SETTLE_TIMEOUT_S = 10.0


class SweepOptions(TypedDict, total=False):
    """The keyword options of ``sweep_cancellation`` and ``assert_sweep_clean``."""

    steps: SampleSteps
    counted: CountedTasks
    invariants: Sequence[Invariant]
    allowed_errors: tuple[type[BaseException], ...]
    prepare: Callable[[], Awaitable[object]] | None
    settle: Callable[[], Awaitable[object]] | None
    checks: BuiltinChecks
    run_timeout_s: float | None
    settle_rounds: int
    settle_timeout_s: float


@attrs.define
class _RunBox:
    """What the target's task hands back to the sweep."""

    error: BaseException | None = None
    finished: trio.Event = attrs.field(factory=trio.Event)


async def _drive(
    target: Callable[[Unpack[PosArgsT]], Awaitable[object]],
    args: tuple[*PosArgsT],
    run_scope: trio.CancelScope,
    target_scope: trio.CancelScope,
    cutter: StepCutter,
    box: _RunBox,
) -> None:
    """Body of the target's system task: run it, keep how it ended, never raise.

    Cancellation: the target is cancelled through ``target_scope`` (the cut) or
    ``run_scope`` (the watchdog); either ends up in ``box.error``.
    """
    try:
        with run_scope, target_scope:
            try:
                await target(*args)
            except BaseException as exc:  # classified by the sweep
                box.error = exc
            finally:
                cutter.stop()
    finally:
        box.finished.set()


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _classify(
    box: _RunBox, cutter: StepCutter, allowed: tuple[type[BaseException], ...]
) -> RunOutcome:
    if cutter.failure is not None:
        return RunFailed(cutter.failure, "the sweep's step counter failed")
    if box.error is None:
        return RunCompleted(cancel_issued=cutter.cancel_issued)
    leaves = _leaves(box.error)
    cancelled = [leaf for leaf in leaves if isinstance(leaf, trio.Cancelled)]
    others = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if cancelled and not cutter.cancel_issued:
        return RunFailed(box.error, "raised Cancelled although the sweep had not cancelled it")
    if not others:
        return RunCancelled(traceback_stack(cancelled[0]))
    if allowed and all(isinstance(leaf, allowed) for leaf in others):
        return RunRaisedAllowed(box.error)
    return RunFailed(box.error, f"raised {type(box.error).__name__}, which is not allowed")


@attrs.frozen(kw_only=True)
class _Sweep:
    """One sweep's settings; ``run`` does one run of the target."""

    target: Callable[..., Awaitable[object]]
    args: tuple[object, ...]
    name: str
    counted: CountedTasks
    invariants: Sequence[Invariant]
    allowed: tuple[type[BaseException], ...]
    prepare: Callable[[], Awaitable[object]] | None
    settle: Callable[[], Awaitable[object]] | None
    checks: BuiltinChecks
    run_timeout_s: float
    settle_rounds: int
    settle_timeout_s: float

    @property
    def grace_s(self) -> float:
        """How long a cancelled hung run may take to unwind."""
        return min(HANG_GRACE_S, self.run_timeout_s)

    async def run(self, cut_at: int | None) -> RunResult:
        """One run, cut after step ``cut_at`` (``None``: uncut, not checked for leaks).

        Cancellation: cancels the run too and waits up to ``grace_s`` for it.
        """
        if self.prepare is not None:
            await self.prepare()
        await self._quiet()
        before = take_snapshot(self.checks)
        run_scope = trio.CancelScope()
        target_scope = trio.CancelScope()
        cutter = StepCutter(cut_at, self.counted, target_scope, trio.lowlevel.current_task())
        box = _RunBox()
        trio.lowlevel.add_instrument(cutter)
        try:
            root = trio.lowlevel.spawn_system_task(
                _drive,
                self.target,
                self.args,
                run_scope,
                target_scope,
                cutter,
                box,
                name=self.name,
                context=contextvars.copy_context(),
            )
            cutter.attach(root)
            hang = await self._watch(root, run_scope, cutter, box)
        finally:
            trio.lowlevel.remove_instrument(cutter)
        outcome = hang or _classify(box, cutter, self.allowed)
        leaks: tuple[Leak, ...] = ()
        if cut_at is not None and box.finished.is_set():
            leaks = await self._settle(before, cutter)
        return RunResult(cut_at, cutter.steps, outcome, cutter.landing, leaks)

    async def _watch(
        self,
        root: trio.lowlevel.Task,
        run_scope: trio.CancelScope,
        cutter: StepCutter,
        box: _RunBox,
    ) -> RunHung | None:
        """Wait for the run within its bound; past it, record the stacks and unwind it.

        Returns ``None`` when the run ended in time. Cancellation: cancels the run
        and waits up to ``grace_s`` (shielded) for it before re-raising.
        """
        try:
            with trio.move_on_after(self.run_timeout_s):
                await box.finished.wait()
            if box.finished.is_set():
                return None
            stuck = {task: None for task in [*tasks_under(root), *cutter.members_alive()]}
            stacks = tuple(task_stack(task) for task in stuck)
            run_scope.cancel(reason="cancellation sweep: the run passed its bound")
            unwinding = Unwinding.AFTER_CANCEL
            with trio.move_on_after(self.grace_s):
                await box.finished.wait()
            if not box.finished.is_set():
                lift_shields(tasks_under(root))
                unwinding = Unwinding.AFTER_LIFTING_SHIELDS
                with trio.move_on_after(self.grace_s):
                    await box.finished.wait()
            if not box.finished.is_set():
                unwinding = Unwinding.NEVER
            return RunHung(self.run_timeout_s, stacks, unwinding)
        except BaseException:
            run_scope.cancel(reason="cancellation sweep: the sweep itself was cancelled")
            with trio.move_on_after(self.grace_s, shield=True):
                await box.finished.wait()
            raise

    async def _quiet(self) -> None:
        """Let the world go idle once (before a baseline snapshot).

        Cancellation: safe anywhere; nothing is held.
        """
        with trio.move_on_after(self.settle_timeout_s):
            await trio.testing.wait_all_tasks_blocked(SETTLE_QUIET_S)
            if self.settle is not None:
                await self.settle()

    async def _settle(self, before: ProcessSnapshot, cutter: StepCutter) -> tuple[Leak, ...]:
        """Leftovers of the run once it has settled (see the module docstring).

        Cancellation: safe anywhere; only waits and looks.
        """
        with trio.move_on_after(self.settle_timeout_s):
            for _ in range(self.settle_rounds):
                await trio.testing.wait_all_tasks_blocked(SETTLE_QUIET_S)
                if self.settle is not None:
                    await self.settle()
                if not self._leaks(before, cutter):
                    return ()
        return self._leaks(before, cutter)

    def _leaks(self, before: ProcessSnapshot, cutter: StepCutter) -> tuple[Leak, ...]:
        return find_leaks(before, self.checks, cutter.started_tasks_alive(), self.invariants)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise SweepUsageError(f"sweep_cancellation: {name} must be positive, got {value!r}")


async def sweep_cancellation(
    target: Callable[[Unpack[PosArgsT]], Awaitable[object]],
    *args: *PosArgsT,
    steps: SampleSteps = EVERY_STEP,
    counted: CountedTasks = CountedTasks.TARGET_TASK,
    invariants: Sequence[Invariant] = (),
    allowed_errors: tuple[type[BaseException], ...] = (),
    prepare: Callable[[], Awaitable[object]] | None = None,
    settle: Callable[[], Awaitable[object]] | None = None,
    checks: BuiltinChecks = BuiltinChecks.ALL,
    run_timeout_s: float | None = None,
    settle_rounds: int = DEFAULT_SETTLE_ROUNDS,
    settle_timeout_s: float = DEFAULT_SETTLE_TIMEOUT_S,
) -> SweepReport:
    """Cut ``target(*args)`` after each of its steps in turn; report what each run left.

    Args:
        target, args: the code under test, called afresh for every run (trio style:
            pass the function and its positional arguments).
        steps: the cut points (default: every step up to ``DEFAULT_MAX_STEPS``).
        counted: whose scheduler steps count (the target's task, or the whole run).
        invariants: callables checked after each run (once settled); each returns
            when it holds and raises ``AssertionError`` when it does not.
        allowed_errors: exception types the target may end with (typed failures
            such as ``RefusedError``); anything else is a failure.
        prepare: awaited before each run, uncounted and uncut (reset state, prime
            a cache); what it opens is part of the baseline.
        settle: awaited in every settle round, bounded by ``settle_timeout_s``
            (wait for cleanup you can name, e.g. ``broker.wait_connections_closed``).
        checks: the built-in leak checks (descriptors, children, tasks).
        run_timeout_s: bound on each run, on trio's clock; past it the run is
            reported as hung. ``None``: ``DEFAULT_RUN_TIMEOUT_S`` on a real clock,
            ``DEFAULT_VIRTUAL_RUN_TIMEOUT_S`` under ``MockClock``.
        settle_rounds: quiet periods to wait for leftovers to clear.
        settle_timeout_s: bound on settling, and on each ``settle`` call.

    Returns:
        The ``SweepReport``; ``report.ok`` when every run was clean and one
        finished before its cut.

    Raises:
        SweepUsageError: a bound is not positive or ``settle_rounds`` is below 1.

    Cancellation: cancelling the sweep cancels the current run and waits up to
    ``HANG_GRACE_S`` for it to unwind; no instrument is left installed.
    """
    if run_timeout_s is None:
        virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        run_timeout_s = DEFAULT_VIRTUAL_RUN_TIMEOUT_S if virtual else DEFAULT_RUN_TIMEOUT_S
    _check_positive("run_timeout_s", run_timeout_s)
    _check_positive("settle_timeout_s", settle_timeout_s)
    if settle_rounds < 1:
        raise SweepUsageError(
            f"sweep_cancellation: settle_rounds must be at least 1, got {settle_rounds}"
        )
    sweep = _Sweep(
        target=target,
        args=args,
        name=getattr(target, "__qualname__", repr(target)),
        counted=counted,
        invariants=tuple(invariants),
        allowed=allowed_errors,
        prepare=prepare,
        settle=settle,
        checks=checks,
        run_timeout_s=run_timeout_s,
        settle_rounds=settle_rounds,
        settle_timeout_s=settle_timeout_s,
    )
    runs = [await sweep.run(None)]
    end = SweepEnd.FAILED if runs[0].failed else SweepEnd.STEP_LIMIT
    if end is SweepEnd.STEP_LIMIT:
        for cut_at in steps.cut_points():
            result = await sweep.run(cut_at)
            runs.append(result)
            if result.failed:
                end = SweepEnd.FAILED
                break
            if not result.cancel_issued:
                end = SweepEnd.COMPLETED
                break
    return SweepReport(
        target=sweep.name,
        steps=steps,
        counted=counted,
        runs=tuple(runs),
        end=end,
        unchecked=unavailable_checks(checks),
    )


async def assert_sweep_clean(
    target: Callable[[Unpack[PosArgsT]], Awaitable[object]],
    *args: *PosArgsT,
    **options: Unpack[SweepOptions],
) -> SweepReport:
    """``sweep_cancellation`` that raises a readable ``AssertionError`` unless clean.

    Takes the same arguments; returns the report of a clean sweep (for step
    counts and totals). Cancellation: as ``sweep_cancellation``.
    """
    report = await sweep_cancellation(target, *args, **options)
    report.raise_for_failure()
    return report
