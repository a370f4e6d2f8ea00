"""Looking at trio tasks from outside: their stacks, their trees, their shields.

What this module does: turns a suspended task (``Task.iter_await_frames``) or an
exception's traceback into a tuple of ``StackEntry``; finds the frame a report
should name (the innermost one outside trio, the standard library and the sweep
itself); lists the tasks still alive under a task (``Task.child_nurseries``,
``Nursery.child_tasks``); and, as a last resort after a hang was reported,
lifts the shields that keep such tasks from seeing a cancellation.

How shields are found: a ``with trio.CancelScope(shield=True):`` block keeps the
scope's bound ``__exit__`` on its coroutine frame's value stack, which the
garbage collector's ``gc.get_referents`` exposes (trio's own
``iter_await_frames`` uses the same route for async generators). Only public
objects are touched: ``CancelScope.shield`` is a settable public attribute.

What it does not do: change anything else about a task, or reach a task that is
blocked outside trio (a thread that never returns, ``abandon_on_cancel=False``):
no shield can be lifted there.
"""

from __future__ import annotations

import gc
import linecache
import os
import sysconfig
import types
from collections.abc import Iterable, Iterator

import attrs
import outcome
import trio

#: Frames under these directories are plumbing, not where a cancel "lands": trio,
#: the outcome package (it re-raises every result trio sends into a task) and the
#: standard library (contextlib's wrappers above all).
_PLUMBING_DIRS = tuple(
    os.path.dirname(path) + os.sep for path in (trio.__file__, outcome.__file__) if path
)
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
#: Installed packages may live under the standard library's directory (a system
#: Python without a virtualenv); they are never plumbing.
_PACKAGE_DIRS = tuple({sysconfig.get_paths()[key] + os.sep for key in ("purelib", "platlib")})
#: The sweep's own modules sit at the bottom of every swept stack.
_SWEEP_DIR = os.path.dirname(__file__) + os.sep
_SWEEP_PREFIX = "_sweep"


@attrs.frozen
class StackEntry:
    """One frame of a stack: where, in which function, and the source line."""

    filename: str
    lineno: int
    function: str
    line: str

    @property
    def location(self) -> str:
        """``path:line (function)``, the path relative to the working directory if under it."""
        path = self.filename
        try:
            relative = os.path.relpath(path)
        except ValueError:  # another drive (Windows)
            relative = path
        if not relative.startswith(os.pardir):
            path = relative
        return f"{path}:{self.lineno} ({self.function})"

    def __str__(self) -> str:
        return f"{self.location}: {self.line}" if self.line else self.location


@attrs.frozen
class TaskStack:
    """A task's name and where it is suspended (outermost frame first)."""

    name: str
    stack: tuple[StackEntry, ...]

    @property
    def where(self) -> StackEntry | None:
        return innermost_own_frame(self.stack)


def _entry(frame: types.FrameType, lineno: int) -> StackEntry:
    filename = frame.f_code.co_filename
    line = linecache.getline(filename, lineno, frame.f_globals).strip()
    return StackEntry(filename, lineno, frame.f_code.co_name, line)


def task_stack(task: trio.lowlevel.Task) -> TaskStack:
    """Where ``task`` is suspended now; an empty stack once it has finished."""
    return TaskStack(task.name, tuple(_entry(f, n) for f, n in task.iter_await_frames()))


def traceback_stack(exc: BaseException) -> tuple[StackEntry, ...]:
    """The frames of ``exc``'s traceback, outermost first (down to where it was raised)."""
    entries: list[StackEntry] = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append(_entry(tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return tuple(entries)


def _is_plumbing(entry: StackEntry) -> bool:
    name = entry.filename
    if name.startswith(_SWEEP_DIR) and os.path.basename(name).startswith(_SWEEP_PREFIX):
        return True
    if name.startswith(_PLUMBING_DIRS):
        return True
    return name.startswith(_STDLIB_DIR) and not name.startswith(_PACKAGE_DIRS)


def innermost_own_frame(stack: tuple[StackEntry, ...]) -> StackEntry | None:
    """The innermost frame that is neither trio, the standard library nor the sweep.

    Falls back to the innermost frame when every frame is plumbing.
    """
    for entry in reversed(stack):
        if not _is_plumbing(entry):
            return entry
    return stack[-1] if stack else None


def own_frames_text(stack: tuple[StackEntry, ...]) -> str:
    """The innermost own frame, and the outermost one it was called from if different.

    ``rpbroker/streams.py:35 (receive_some): ..., called from test_x.py:12 (fetch)``:
    where it happened, and which line of the code under test led there.
    """
    inner = innermost_own_frame(stack)
    if inner is None:
        return "(no frames)"
    outer = next((entry for entry in stack if not _is_plumbing(entry)), inner)
    return str(inner) if outer is inner else f"{inner}, called from {outer.location}"


def tasks_under(root: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    """``root`` (while alive) and every task alive in a nursery below it."""
    todo = [root]
    while todo:
        task = todo.pop()
        yield task
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)


def _awaited_objects(task: trio.lowlevel.Task) -> Iterator[object]:
    """The coroutines, generators and async generators ``task`` is suspended in."""
    coro: object = task.coro
    while coro is not None:
        yield coro
        if isinstance(coro, types.CoroutineType):
            coro = coro.cr_await
        elif isinstance(coro, types.GeneratorType):
            coro = coro.gi_yieldfrom
        else:
            # An async generator's asend/athrow object: reach the generator through
            # its referents, as trio.lowlevel.Task.iter_await_frames does.
            for referent in gc.get_referents(coro):
                if isinstance(referent, types.AsyncGeneratorType):
                    yield referent
                    coro = referent.ag_await
                    break
            else:
                return


def _scopes_held_by(objects: Iterable[object]) -> Iterator[trio.CancelScope]:
    for obj in objects:
        for referent in gc.get_referents(obj):
            if isinstance(referent, trio.CancelScope):
                yield referent
            elif isinstance(referent, types.MethodType) and isinstance(
                referent.__self__, trio.CancelScope
            ):
                yield referent.__self__


def lift_shields(tasks: Iterable[trio.lowlevel.Task]) -> int:
    """Unshield every cancel scope the suspended ``tasks`` are inside; the number lifted.

    A last resort for tasks that ignored a cancellation: a scope whose shield is
    lifted lets a pending outer cancellation through at the next checkpoint.
    """
    lifted = 0
    for task in tasks:
        for scope in _scopes_held_by(_awaited_objects(task)):
            if scope.shield:
                scope.shield = False
                lifted += 1
    return lifted
