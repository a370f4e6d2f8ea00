"""The instrument behind a cancellation sweep: count scheduler steps, cancel after the k-th.

What this module does: ``StepCutter`` is a ``trio.abc.Instrument`` added for one
run of a swept target. It tracks the run's tasks (the target's task and every
task started from them), counts the steps ``CountedTasks`` selects (the
target's task, the run's tasks, or every task but the sweep's) in
``before_task_step``, and in ``after_task_step`` of the k-th counted step cancels
the target's cancel scope and records where the task that just ran is suspended
(the ``StepLanding``). It also remembers every task the run started, so leftovers
can be reported after the run.

Why cancelling from ``after_task_step`` is safe: the hook runs on the run loop's
thread between two task steps, while trio's "current task" is still the task
that just stepped. ``CancelScope.cancel()`` is synchronous; it marks the scope
and calls the abort functions of the tasks blocked inside it, exactly as it would
had that task called ``cancel()`` as the last thing before yielding (trio itself
cancels scopes from the run loop when deadlines expire). The alternatives are
late: a deadline of ``-inf`` or ``run_sync_soon`` take effect only after the
other runnable tasks of this batch have stepped, so the cut would not sit at a
known step.

Where the cancel lands: when the task that just ran is blocked in an abortable
wait (I/O, a sleep, an event) or at ``trio.lowlevel.checkpoint()`` (which is
what ``trio.sleep(0)`` is: it looks for a cancellation when it resumes),
``Cancelled`` is raised right there. A ``cancel_shielded_checkpoint`` (trio
ends a successful I/O call with one) has already been rescheduled, so the
cancel lands at the task's next checkpoint instead, or nowhere if none follows;
the sweep reports both where the cut was made and where ``Cancelled`` was raised.

What it does not do: run, bound or judge the target (``_sweep`` does), or count
tasks unrelated to the run.
"""

from __future__ import annotations

import attrs
import trio

from ._sweep_steps import CountedTasks
from ._sweep_tasks import TaskStack, task_stack


@attrs.frozen
class StepLanding:
    """Where a run was cut: the step number and the stack of the task that just ran."""

    step: int
    task: TaskStack

    @property
    def finished(self) -> bool:
        """The counted task had finished in that step (the cut came after its end)."""
        return not self.task.stack


class StepCutter(trio.abc.Instrument):
    """Counts the steps of one run's tasks and cancels ``scope`` after step ``cut_at``.

    ``cut_at=None`` only counts (an uncancelled run). Add it with
    ``trio.lowlevel.add_instrument`` before the target's task is spawned, then call
    ``attach`` with that task before it first runs, and ``stop`` as soon as the
    target has returned.
    """

    def __init__(
        self,
        cut_at: int | None,
        counted: CountedTasks,
        scope: trio.CancelScope,
        watcher: trio.lowlevel.Task,
    ) -> None:
        self._cut_at = cut_at
        self._counted = counted
        self._scope = scope
        #: The sweep's own task: never counted.
        self._watcher = watcher
        self._root: trio.lowlevel.Task | None = None
        #: The target's task and every task started from the run (alive or not).
        self._members: set[trio.lowlevel.Task] = set()
        #: Members that have not exited.
        self._alive: set[trio.lowlevel.Task] = set()
        self._counting = False
        self.steps = 0
        self.landing: StepLanding | None = None
        #: An exception raised inside a hook (trio would disable the instrument).
        self.failure: BaseException | None = None

    @property
    def cancel_issued(self) -> bool:
        return self.landing is not None

    def attach(self, root: trio.lowlevel.Task) -> None:
        """Start counting: ``root`` is the task that runs the target."""
        self._root = root
        self._members.add(root)
        self._alive.add(root)
        self._counting = True

    def stop(self) -> None:
        """Stop counting and cutting (the target has returned); tracking goes on."""
        self._counting = False

    def started_tasks_alive(self) -> list[trio.lowlevel.Task]:
        """Tasks the run started that are still alive (not including the target's task)."""
        return sorted(self._alive - {self._root}, key=lambda task: task.name)

    def members_alive(self) -> list[trio.lowlevel.Task]:
        """Every task of the run still alive (the target's task first, if alive)."""
        alive = self.started_tasks_alive()
        if self._root in self._alive:
            alive.insert(0, self._root)
        return alive

    def _counts(self, task: trio.lowlevel.Task) -> bool:
        match self._counted:
            case CountedTasks.TARGET_TASK:
                return task is self._root
            case CountedTasks.WHOLE_RUN:
                return task in self._members
            case CountedTasks.EVERY_TASK:
                return task is not self._watcher

    # -- trio.abc.Instrument hooks (they must never raise: trio would drop us) --

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self._root is None:
            return
        try:
            spawner: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        except RuntimeError:  # spawned from the run loop itself, not by a task
            spawner = None
        parent = task.parent_nursery.parent_task if task.parent_nursery is not None else None
        if spawner in self._members or parent in self._members:
            self._members.add(task)
            self._alive.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._alive.discard(task)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._counting and self._counts(task):
            self.steps += 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self._counting or self.steps != self._cut_at or self.landing is not None:
            return
        if not self._counts(task):
            return
        try:
            self.landing = StepLanding(self.steps, task_stack(task))
            self._scope.cancel(reason=f"cancellation sweep: cut after step {self.steps}")
        except BaseException as exc:  # reported by the sweep as its own failure
            self.failure = exc
            self._counting = False
