"""Making a backend's whole process group die with the broker, even a SIGKILLed one (Unix).

The problem: ``PR_SET_PDEATHSIG`` (``_unix_spawn``) kills a backend when the broker
dies, but it is not inherited: the backend's own children (its process group) are
re-parented to init and live on. macOS has no parent-death signal at all.

What this module does: ``GroupReaper`` owns one small helper process per trio run,
the *reaper* (``_unix_reaper_program``), started when the first group is watched
and stopped when the last one is forgotten. The broker holds the only write end of
a pipe whose read end only the reaper holds, and writes one record per change: watch
a group right after its leader was spawned, forget it right before its leader is
reaped. When the broker dies, however it dies, the kernel closes the write end; the
reaper reads end of file, SIGKILLs every group it still watches and exits.
``current_group_reaper`` returns the run's instance (a ``trio.lowlevel.RunVar``).

Why this design:

- ``PR_SET_CHILD_SUBREAPER`` on the broker only changes who inherits orphans while
  the broker lives; when the broker itself dies nothing is killed.
- A PID namespace per backend (its init dies, the kernel kills the namespace) is
  exact but needs privileges or user namespaces and changes the pids backends
  see (and report to the broker).
- A pty session (SIGHUP when the session leader dies) reaches only the foreground
  group and can be ignored by any process.
- A reaper needs nothing but a pipe: end of file on a pipe is delivered by the
  kernel whatever killed the writer, and it works the same on Linux and macOS.

The process-group id reuse hazard, and how it is avoided: a group id is the pid
of its leader, and Linux (like every Unix) does not hand out a number while it
is in use as a process group id, that is while any member lives, nor while the
leader is an unreaped zombie. Hence:

1. a group is watched only while its leader is alive and unreaped (right after
   the spawn, before the broker could reap it);
2. ``UnixChildProcess`` SIGKILLs the group and *then* forgets it, both before it
   reaps the leader; while the broker lives, the reaper therefore never holds the
   id of a group that could have been reused;
3. when the broker dies, the reaper kills at once, while the groups still have
   members (a group without members needs nothing killed). Only a group that
   empties completely *and* whose id is handed out again between the broker's
   death and the reaper's ``killpg`` could be hit: that needs the whole pid space
   (``pid_max``, at least 32768) to wrap around within that instant.

Descriptors: the write end is close-on-exec and non-blocking (a write never
stalls the event loop: a reaper that stops reading is replaced); the read end is
passed to the reaper alone and closed in the broker right after the reaper's
spawn, so no backend inherits either end (``spawn_child`` also closes every
descriptor it does not pass). The reaper runs in its own session, so terminal
signals meant for the broker do not reach it.

What it does not do: follow a process that leaves its group (``setsid``,
``setpgid``): no process-group mechanism can (cgroups could); or protect groups
of a process that ``fork``s without ``exec`` while a group is watched (the fork
inherits the write end, so the reaper sees end of file only when both are gone).
If the reaper itself is killed, it is noticed at the next watch or forget and
replaced, and the new one is told every group still watched; a record written in
the instant between the kill and the reaper's death is taken by the dying reaper,
so that one change is covered only from the next one on.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_reaper is part of the Unix transport"

import os
import subprocess
from pathlib import Path

import trio

from transports._interface import SpawnError
from transports._unix_fds import above_stdio, close_fd_quietly
from transports._unix_reaper_program import FORGET, MIN_PGID, RECORD, WATCH

#: The reaper program, run by path (``-I -S``: no site-packages, no environment).
_PROGRAM = str(Path(__file__).with_name("_unix_reaper_program.py"))


class GroupReaper:
    """The broker's side of one reaper process (see the module docstring).

    Every method is synchronous and brief: it only writes a few bytes to a
    non-blocking pipe, or starts or stops the reaper.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._write_fd: int | None = None
        self._groups: set[int] = set()

    @property
    def pid(self) -> int | None:
        """The running reaper's pid, or ``None`` while no group is watched."""
        return self._process.pid if self._process is not None else None

    @property
    def watched(self) -> frozenset[int]:
        """The process group ids being watched."""
        return frozenset(self._groups)

    def ensure_running(self) -> None:
        """Start the reaper now if none runs, so a spawn cannot be left unprotected.

        Raises ``SpawnError`` if it cannot be started.
        """
        if self._process is None or self._process.poll() is not None:
            self._restart()

    def stop_if_idle(self) -> None:
        """Stop the reaper if it watches no group (a spawn it was started for failed)."""
        if not self._groups:
            self._stop()

    def watch(self, pgid: int) -> None:
        """Kill group ``pgid`` if the broker dies; call while its leader is unreaped.

        Raises ``SpawnError`` if no reaper can be started (the group is then not
        watched) and ``ValueError`` for an id below 2.
        """
        if pgid < MIN_PGID:
            raise ValueError(f"process group id {pgid} cannot be watched")
        self._groups.add(pgid)
        if not self._send(WATCH, pgid):
            try:
                self._restart()
            except SpawnError:
                self._groups.discard(pgid)
                raise

    def forget(self, pgid: int) -> None:
        """Stop watching ``pgid``; call after killing the group, before reaping its leader.

        Never raises. Forgetting the last group stops the reaper.
        """
        if pgid not in self._groups:
            return
        self._groups.discard(pgid)
        if not self._groups:
            self._stop()
        elif not self._send(FORGET, pgid):
            # A replaced reaper learns only the groups still watched. If none can
            # be started the next watch reports it.
            try:
                self._restart()
            except SpawnError:
                self._stop()

    def _send(self, operation: bytes, pgid: int) -> bool:
        """Write one record; False when there is no live reaper to take it."""
        if self._write_fd is None or self._process is None or self._process.poll() is not None:
            return False
        try:
            # RECORD.size < PIPE_BUF: the write is atomic, all or nothing.
            return os.write(self._write_fd, RECORD.pack(operation, pgid)) == RECORD.size
        except OSError:  # BlockingIOError (not reading), BrokenPipeError (gone), ...
            return False

    def _restart(self) -> None:
        """Replace the reaper and tell the new one every watched group. Raises ``SpawnError``."""
        self._stop()
        self._start()
        for pgid in sorted(self._groups):
            if not self._send(WATCH, pgid):
                self._stop()
                raise SpawnError("the process-group reaper exited right after it was started")

    def _start(self) -> None:
        if not sys.executable:
            raise SpawnError("cannot start the process-group reaper: sys.executable is unknown")
        # Both close-on-exec (PEP 446), and above 2: a read end at 0 would be
        # replaced by the reaper's stdin, a write end at 1 or 2 inherited by
        # every later child as its stdout or stderr.
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # EMFILE/ENFILE
            raise SpawnError(f"cannot start the process-group reaper: {exc}") from exc
        try:
            read_fd, write_fd = above_stdio(read_fd), above_stdio(write_fd)
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", _PROGRAM, str(read_fd)],
                pass_fds=(read_fd,),
                close_fds=True,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={},
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            close_fd_quietly(write_fd)
            raise SpawnError(f"cannot start the process-group reaper: {exc}") from exc
        finally:
            close_fd_quietly(read_fd)
        os.set_blocking(write_fd, False)
        self._process, self._write_fd = process, write_fd

    def _stop(self) -> None:
        """End the reaper without it killing anything: SIGKILL, reap, close the pipe."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()  # unreaped, so the pid is still this child's
            process.wait()  # killed: returns as soon as the kernel has torn it down
        if self._write_fd is not None:
            fd, self._write_fd = self._write_fd, None
            close_fd_quietly(fd)


_CURRENT: trio.lowlevel.RunVar[GroupReaper] = trio.lowlevel.RunVar("transports_group_reaper")


def current_group_reaper() -> GroupReaper:
    """The ``GroupReaper`` of the current trio run (created on first use)."""
    try:
        return _CURRENT.get()
    except LookupError:
        reaper = GroupReaper()
        _CURRENT.set(reaper)
        return reaper
