"""Spawning backend processes that cannot outlive the broker (Unix).

What this module does: ``spawn_child`` starts a backend in its own session and
process group, hands it the child end of a control socketpair (and no other
descriptor), and on Linux arranges ``PR_SET_PDEATHSIG(SIGKILL)`` so the kernel
kills it when the broker dies, even by SIGKILL. ``UnixChildProcess`` waits for
the exit without polling (a pidfd on Linux, a worker thread elsewhere) and
signals the whole process group.

Why ``subprocess.Popen`` is called directly: ``PR_SET_PDEATHSIG`` fires when the
*thread* that forked the child exits, and trio's process APIs fork from a worker
thread that is retired after a few idle seconds, which would kill every backend.
Forking from the calling trio thread ties the backends to the thread running the
broker. The fork/exec is synchronous and brief.

What it does not do: decide what to spawn, restart crashed children, or wait for
readiness (the broker's supervision does).
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_spawn is part of the Unix transport"

import contextlib
import ctypes
import os
import signal
import subprocess
import weakref
from collections.abc import Mapping, Sequence

import trio

from transports._interface import ChildControl, SpawnError
from transports._unix_control import UnixChildControl
from transports._unix_fds import close_fd_quietly

#: ``PR_SET_PDEATHSIG`` from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1

#: Exit status of a child whose parent died before it could arm the death signal.
_EXIT_PARENT_GONE = 125

if sys.platform == "linux":
    # Loaded in the parent so the child (between fork and exec) only calls into it.
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _PRCTL = _LIBC.prctl
    _PRCTL.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _PRCTL.restype = ctypes.c_int


class _DieWithParent:
    """``preexec_fn`` (Linux): arm ``PR_SET_PDEATHSIG(SIGKILL)``, then check the parent.

    Runs in the child between fork and exec. If the parent already died before
    the signal was armed, nobody would deliver it, so the child exits at once.
    """

    def __init__(self, parent_pid: int) -> None:
        self._parent_pid = parent_pid

    def __call__(self) -> None:
        if sys.platform == "linux":
            if _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
        if os.getppid() != self._parent_pid:
            os._exit(_EXIT_PARENT_GONE)


class UnixChildProcess:
    """A spawned backend: the leader of its own process group (implements ``ChildProcess``)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._pgid = popen.pid  # start_new_session: the child leads its group
        self._wait_lock = trio.Lock()
        self._pidfd: int | None = None
        self._pidfd_finalizer: weakref.finalize[[int], UnixChildProcess] | None = None
        if sys.platform == "linux":
            try:
                self._pidfd = os.pidfd_open(popen.pid)
            except OSError:
                self._pidfd = None  # old kernel or sandbox: fall back to a thread
            else:
                self._pidfd_finalizer = weakref.finalize(self, os.close, self._pidfd)

    def __repr__(self) -> str:
        return f"<UnixChildProcess pid={self.pid} returncode={self._popen.returncode}>"

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal).

        Reaps the child if it has exited.
        """
        code = self._popen.poll()
        if code is not None and not self._wait_lock.locked():
            self._close_pidfd()
        return code

    async def wait(self) -> int:
        """Wait for the child to exit, reap it and return its exit status.

        Several tasks may wait at once. Cancellation: cancelling a wait does not
        touch the child; another wait can be started later.
        """
        async with self._wait_lock:
            if self._popen.poll() is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                    self._popen.wait()  # exited: this reaps without blocking
                else:
                    await trio.to_thread.run_sync(self._popen.wait, abandon_on_cancel=True)
            self._close_pidfd()
        code = self._popen.returncode
        assert code is not None
        return code

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            if self._pidfd_finalizer is not None:
                self._pidfd_finalizer.detach()
                self._pidfd_finalizer = None
            close_fd_quietly(fd)

    def _signal_tree(self, sig: signal.Signals) -> None:
        reaped = self._popen.returncode is not None
        if not reaped:
            # Not reaped: the pid is still ours even if the child moved to another group.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, sig)
        # The group outlives its leader while any member (a grandchild) is alive,
        # and its id cannot be reused while that is so. After the leader was
        # reaped and the group emptied the id could in principle be reused, so
        # errors (no such group, another user's group) are ignored.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pgid, sig)

    def terminate_tree(self) -> None:
        """SIGTERM to the child and its process group. Idempotent, safe after exit."""
        self._signal_tree(signal.SIGTERM)

    def kill_tree(self) -> None:
        """SIGKILL to the child and its process group. Idempotent, safe after exit."""
        self._signal_tree(signal.SIGKILL)


async def spawn_child(
    argv: Sequence[str],
    env: Mapping[str, str],
    control: ChildControl,
    *,
    cwd: str | None = None,
) -> UnixChildProcess:
    """Start ``argv`` as a backend that inherits the control channel ``control``.

    The child gets exactly ``env`` plus ``control.env`` as its environment, the
    control descriptor and stdio (stdin is ``/dev/null``) and no other descriptor,
    its own session and process group, and on Linux a parent-death SIGKILL. The
    parent's copy of the child end is closed whatever happens. Raises
    ``SpawnError`` naming ``argv[0]`` when the program cannot be started,
    ``TypeError`` for a ``ChildControl`` not made by ``open_control_pair`` and
    ``ValueError`` for one that was already used.

    Cancellation: if cancelled before the fork, nothing is started (the control
    end is still closed); once the child exists the call completes.
    """
    if not isinstance(control, UnixChildControl):
        raise TypeError(f"spawn_child needs the ChildControl of open_control_pair, got {control!r}")
    try:
        if not argv:
            raise SpawnError("cannot start a child: argv is empty")
        await trio.lowlevel.checkpoint_if_cancelled()
        child_fd = control.fileno()
        full_env = {**env, **control.env}
        preexec = _DieWithParent(os.getpid()) if sys.platform == "linux" else None
        try:
            # Deliberately synchronous and in this thread (see the module docstring).
            popen = subprocess.Popen(  # noqa: ASYNC220
                list(argv),
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                pass_fds=(child_fd,),
                close_fds=True,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
    finally:
        control.close()
    child = UnixChildProcess(popen)
    control.channel.bind_child_pid(child.pid)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return child
