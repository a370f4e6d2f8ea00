"""A stand-in for a backend process (implements ``transports.ChildProcess``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import trio

import transports

#: Fake pids start here: far above any real pid on a default Linux system
#: (``pid_max`` is 4194304 at most, but real pids in this range are rare in tests).
FIRST_FAKE_PID = 900_000

#: Exit status of a fake killed by ``kill_tree`` (as for SIGKILL on Unix).
KILLED_STATUS = -9
#: Exit status of a fake stopped by ``terminate_tree`` (as for SIGTERM on Unix).
TERMINATED_STATUS = -15

_pids = itertools.count(FIRST_FAKE_PID)


def _now() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run
        return None


class FakeProcess:
    """A process-like handle whose life is decided by the test (and the fake backend).

    ``exit(status)`` ends it (idempotent: the first status wins); ``kill_tree``
    exits with ``-9`` and ``terminate_tree`` with ``-15`` (unless
    ``terminate_exits`` is false: then the request is recorded and ignored).
    ``signals`` records, in order, every request the broker made while the process
    was alive: ``"SIGKILL"`` for ``kill_tree`` and ``"SIGTERM"`` for
    ``terminate_tree`` (on every platform). (The broker also signals a process
    group once its leader has exited, for stragglers; that reaches no fake.)
    ``started_at`` and ``exited_at`` are ``trio.current_time()`` values, exact under
    ``MockClock``.
    """

    def __init__(self, pid: int | None = None, *, terminate_exits: bool = True) -> None:
        self._pid = next(_pids) if pid is None else pid
        self._returncode: int | None = None
        self._exited = trio.Event()
        self._exit_callbacks: list[Callable[[], None]] = []
        self.terminate_exits = terminate_exits
        self.signals: list[str] = []
        self.started_at: float | None = _now()
        self.exited_at: float | None = None

    def __repr__(self) -> str:
        return f"<FakeProcess pid={self._pid} returncode={self._returncode}>"

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        """``None`` while running, then the exit status (negative for a signal)."""
        return self._returncode

    @property
    def output(self) -> transports.ChildOutput | None:
        """Always ``None``: a fake backend writes no output."""
        return None

    @property
    def alive(self) -> bool:
        return self._returncode is None

    async def wait(self) -> int:
        """Wait until the process exits and return its status.

        Cancellation: cancelling the wait does not touch the process.
        """
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def terminate_tree(self) -> None:
        """Record SIGTERM; exit with ``-15`` unless ``terminate_exits`` is false. Idempotent."""
        if self._returncode is not None:
            return
        self.signals.append("SIGTERM")
        if self.terminate_exits:
            self.exit(TERMINATED_STATUS)

    def kill_tree(self) -> None:
        """Record SIGKILL and exit with ``-9``. Idempotent."""
        if self._returncode is not None:
            return
        self.signals.append("SIGKILL")
        self.exit(KILLED_STATUS)

    def exit(self, status: int) -> None:
        """End the process with ``status`` (a test's way to simulate a crash). Idempotent."""
        if self._returncode is not None:
            return
        self._returncode = status
        self.exited_at = _now()
        self._exited.set()
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            callback()

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (synchronously) when the process exits; at once if it has."""
        if self._returncode is not None:
            callback()
        else:
            self._exit_callbacks.append(callback)


def _conforms(process: FakeProcess) -> transports.ChildProcess:
    """Static check that the class implements the protocol (mypy verifies this)."""
    return process
