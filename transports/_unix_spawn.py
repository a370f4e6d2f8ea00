"""Spawning backend processes that cannot outlive the broker, nor can their children (Unix).

What this module does: ``spawn_child`` starts a backend in its own session and
process group, hands it the child end of a control socketpair (and no other
descriptor), and on Linux arranges ``PR_SET_PDEATHSIG(SIGKILL)`` so the kernel
kills it when the broker dies, even by SIGKILL. The backend's group is watched by
the run's reaper (``_unix_reaper``), which kills the whole group, grandchildren
included, when the broker dies. ``UnixChildProcess`` waits for the exit without
polling (a pidfd on Linux, a worker thread elsewhere) and signals the whole
process group.

A backend's group goes with it: when the leader's exit is noticed (``wait``,
``returncode``), the group is SIGKILLed and forgotten by the reaper *before* the
leader is reaped. The unreaped leader keeps its pid, which is the group id,
reserved, so neither that kill nor any later signal can reach a group that
reused the id (after the reap nothing is signalled). On macOS before Python 3.13
(no ``os.waitid``) the exit cannot be seen without reaping; there the group is
killed right after the reap instead, which leaves the id-reuse hazard of a
microsecond window.

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

from transports._interface import ChildControl, ChildOutput, SpawnError
from transports._unix_control import UnixChildControl
from transports._unix_fds import close_fd_quietly
from transports._unix_reaper import GroupReaper, current_group_reaper

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


#: Whether an exit can be seen without reaping (``os.waitid`` with ``WNOWAIT``);
#: not on macOS before Python 3.13, where ``os.waitid`` is missing.
_SEES_EXIT_WITHOUT_REAPING = not (sys.platform == "darwin" and sys.version_info < (3, 13))


def _exited_unreaped(pid: int) -> bool:
    """Whether child ``pid`` has exited; it stays unreaped (a zombie) either way."""
    if sys.platform == "darwin" and sys.version_info < (3, 13):
        return False  # never called there: see _SEES_EXIT_WITHOUT_REAPING
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False  # already reaped


def _block_until_exited(popen: subprocess.Popen[bytes]) -> None:
    """Block until the child exits, without reaping it where the platform allows."""
    if sys.platform == "darwin" and sys.version_info < (3, 13):
        popen.wait()  # reaps: see the module docstring
        return
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT)


class _OutputPipes:
    """Two pipes for a child's stdout and stderr; each end is closed exactly once."""

    def __init__(self, stdout: tuple[int, int], stderr: tuple[int, int]) -> None:
        self.stdout_r, self.stdout_w = stdout
        self.stderr_r, self.stderr_w = stderr
        self._child_open = True
        self._parent_open = True

    @classmethod
    def open(cls, program: str) -> _OutputPipes:
        """Both pipes (close-on-exec; ``Popen`` dups the write ends onto 1 and 2)."""
        try:
            stdout = os.pipe()
        except OSError as exc:
            raise SpawnError(f"cannot create the output pipes for {program!r}: {exc}") from exc
        try:
            stderr = os.pipe()
        except OSError as exc:
            for fd in stdout:
                close_fd_quietly(fd)
            raise SpawnError(f"cannot create the output pipes for {program!r}: {exc}") from exc
        return cls(stdout, stderr)

    def close_child_ends(self) -> None:
        if self._child_open:
            self._child_open = False
            close_fd_quietly(self.stdout_w)
            close_fd_quietly(self.stderr_w)

    def close_parent_ends(self) -> None:
        if self._parent_open:
            self._parent_open = False
            close_fd_quietly(self.stdout_r)
            close_fd_quietly(self.stderr_r)

    def streams(self) -> ChildOutput:
        """The read ends as non-blocking trio streams, which now own them."""
        self._parent_open = False
        return ChildOutput(
            stdout=trio.lowlevel.FdStream(self.stdout_r),
            stderr=trio.lowlevel.FdStream(self.stderr_r),
        )


class UnixChildProcess:
    """A spawned backend: the leader of its own process group (implements ``ChildProcess``)."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        reaper: GroupReaper,
        output: ChildOutput | None = None,
    ) -> None:
        self._popen = popen
        self._output = output
        self._pgid = popen.pid  # start_new_session: the child leads its group
        self._reaper = reaper
        self._group_ended = False
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
    def output(self) -> ChildOutput | None:
        """The read ends of its stdout and stderr pipes, if spawned with ``capture_output``."""
        return self._output

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal).

        If the child has exited, kills what is left of its group and reaps it.
        """
        self._observe_exit()
        code = self._popen.returncode
        if code is not None and not self._wait_lock.locked():
            self._close_pidfd()
        return code

    async def wait(self) -> int:
        """Wait for the child to exit, kill what is left of its group, reap it, return its status.

        Several tasks may wait at once. Cancellation: cancelling a wait does not
        touch the child; another wait can be started later.
        """
        async with self._wait_lock:
            if self._popen.returncode is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    await trio.to_thread.run_sync(
                        _block_until_exited, self._popen, abandon_on_cancel=True
                    )
            self._observe_exit()
            self._close_pidfd()
        code = self._popen.returncode
        assert code is not None
        return code

    def _observe_exit(self) -> None:
        """If the leader has exited: end its group while its zombie holds the id, then reap it."""
        if self._popen.returncode is None:
            if _SEES_EXIT_WITHOUT_REAPING:
                if not _exited_unreaped(self._popen.pid):
                    return
                self._end_group()
                self._popen.wait()  # exited: this reaps without blocking
                return
            if self._popen.poll() is None:
                return
        self._end_group()  # a no-op unless the reap came first (macOS < 3.13)

    def _end_group(self) -> None:
        """SIGKILL the group and stop the reaper watching it; only the first call acts."""
        if self._group_ended:
            return
        self._group_ended = True
        # ProcessLookupError: no member is left; PermissionError: a member changed
        # its credentials (setuid); nothing more can be done for either.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pgid, signal.SIGKILL)
        self._reaper.forget(self._pgid)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            if self._pidfd_finalizer is not None:
                self._pidfd_finalizer.detach()
                self._pidfd_finalizer = None
            close_fd_quietly(fd)

    def _signal_tree(self, sig: signal.Signals) -> None:
        if self.returncode is not None:
            return  # reaped, and its group was killed before the reap: nothing is left
        # Unreaped: the pid, and so the group id, is still this child's.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._popen.pid, sig)
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
    capture_output: bool = False,
) -> UnixChildProcess:
    """Start ``argv`` as a backend that inherits the control channel ``control``.

    The child gets exactly ``env`` plus ``control.env`` as its environment, the
    control descriptor and stdio (stdin is ``/dev/null``; with ``capture_output``
    stdout and stderr are pipes whose read ends, as non-blocking trio streams, are
    the process's ``output``, owned by the caller) and no other descriptor,
    its own session and process group, and on Linux a parent-death SIGKILL; its
    group is watched by the run's reaper (started here if none runs). The
    parent's copy of the child end is closed whatever happens. Raises
    ``SpawnError`` naming ``argv[0]`` when the program cannot be started (or
    naming the reaper when that cannot be started; then nothing is left running),
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
        reaper = current_group_reaper()
        reaper.ensure_running()
        full_env = {**env, **control.env}
        preexec = _DieWithParent(os.getpid()) if sys.platform == "linux" else None
        pipes = _OutputPipes.open(argv[0]) if capture_output else None
        try:
            try:
                # Deliberately synchronous and in this thread (see the module docstring).
                popen = subprocess.Popen(  # noqa: ASYNC220
                    list(argv),
                    env=full_env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=None if pipes is None else pipes.stdout_w,
                    stderr=None if pipes is None else pipes.stderr_w,
                    pass_fds=(child_fd,),
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                reaper.stop_if_idle()
                raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
            finally:
                if pipes is not None:
                    pipes.close_child_ends()
            try:
                reaper.watch(popen.pid)
            except SpawnError:
                # Unprotected children are not handed out: kill and reap this one.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(popen.pid, signal.SIGKILL)  # unreaped: the id is still ours
                popen.wait()
                raise
        except BaseException:
            if pipes is not None:
                pipes.close_parent_ends()
            raise
    finally:
        control.close()
    child = UnixChildProcess(popen, reaper, None if pipes is None else pipes.streams())
    control.channel.bind_child_pid(child.pid)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return child
