"""What a swept run may leave behind, and how the sweep finds it.

What this module does: snapshots the process before a run (open descriptors
with their targets, unreaped child processes, through ``transports``) and, after
it, names each leftover as a typed ``Leak``: a descriptor that was not open
before, a child that was not there before, a task the run started that is still
alive, or a caller's invariant that fails (an ``AssertionError`` it raised).

What it does not do: wait for cleanup to finish (the sweep's settle step does),
or notice what a run *closed*: a descriptor or child that disappeared is not a
leak. On a platform where ``transports`` cannot list descriptors or children
(Windows; children also on macOS) that check is skipped and the report says so.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
import trio

import transports

from ._sweep_tasks import TaskStack, task_stack

#: A caller's invariant: returns when it holds, raises ``AssertionError`` when not.
Invariant = Callable[[], object]


class BuiltinChecks(enum.Flag):
    """The leak checks the sweep makes by itself after every run."""

    NONE = 0
    #: Descriptors open now that were not open before the run.
    FDS = enum.auto()
    #: Unreaped child processes that were not there before the run.
    CHILDREN = enum.auto()
    #: Tasks the run started that are still alive after it.
    TASKS = enum.auto()
    ALL = FDS | CHILDREN | TASKS


@attrs.frozen
class LeakedFd:
    fd: int
    #: What it refers to (``socket:[1234]``, a path); ``""`` where unknown.
    target: str

    def __str__(self) -> str:
        return f"descriptor {self.fd} -> {self.target or '?'} left open"


@attrs.frozen
class LeakedChild:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"child process {self.pid} ({self.command}) neither exited nor reaped"


@attrs.frozen
class LeakedTask:
    task: TaskStack

    def __str__(self) -> str:
        where = self.task.where
        at = f" at {where.location}" if where is not None else ""
        return f"task {self.task.name!r} started by the run is still alive{at}"


@attrs.frozen
class BrokenInvariant:
    name: str
    message: str

    def __str__(self) -> str:
        return f"invariant {self.name} failed: {self.message or 'AssertionError'}"


Leak = LeakedFd | LeakedChild | LeakedTask | BrokenInvariant


@attrs.frozen
class ProcessSnapshot:
    """Descriptors and children at one moment; ``None`` for what was not looked at."""

    fds: Mapping[int, str] | None
    children: Mapping[int, str] | None


def take_snapshot(checks: BuiltinChecks) -> ProcessSnapshot:
    return ProcessSnapshot(
        fds=transports.open_fds() if BuiltinChecks.FDS in checks else None,
        children=transports.child_processes() if BuiltinChecks.CHILDREN in checks else None,
    )


def unavailable_checks(checks: BuiltinChecks) -> BuiltinChecks:
    """The requested checks this platform cannot make."""
    snapshot = take_snapshot(checks)
    missing = BuiltinChecks.NONE
    if BuiltinChecks.FDS in checks and snapshot.fds is None:
        missing |= BuiltinChecks.FDS
    if BuiltinChecks.CHILDREN in checks and snapshot.children is None:
        missing |= BuiltinChecks.CHILDREN
    return missing


def invariant_name(invariant: Invariant) -> str:
    return getattr(invariant, "__qualname__", None) or repr(invariant)


def find_leaks(
    before: ProcessSnapshot,
    checks: BuiltinChecks,
    started_alive: Iterable[trio.lowlevel.Task],
    invariants: Sequence[Invariant],
) -> tuple[Leak, ...]:
    """Everything left behind since ``before``, in a stable order.

    Raises whatever an invariant raises other than ``AssertionError`` (a bug in
    the invariant, not a finding).
    """
    after = take_snapshot(checks)
    leaks: list[Leak] = []
    if before.fds is not None and after.fds is not None:
        leaks.extend(
            LeakedFd(fd, target)
            for fd, target in sorted(after.fds.items())
            if before.fds.get(fd) != target
        )
    if before.children is not None and after.children is not None:
        leaks.extend(
            LeakedChild(pid, command)
            for pid, command in sorted(after.children.items())
            if pid not in before.children
        )
    if BuiltinChecks.TASKS in checks:
        leaks.extend(LeakedTask(task_stack(task)) for task in started_alive)
    for invariant in invariants:
        try:
            invariant()
        except AssertionError as exc:
            leaks.append(BrokenInvariant(invariant_name(invariant), str(exc)))
    return tuple(leaks)
