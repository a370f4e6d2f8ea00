"""Backend processes on Windows: spawned into a kill-on-close job object.

What this module does: ``spawn_child`` creates an unnamed job object whose
extended limits set ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``, starts the backend with
``subprocess.Popen`` in a new console process group, with stdin on the null device
and exactly one extra inherited handle (the control pipe's client end, through
``STARTUPINFO.lpAttributeList["handle_list"]``), and assigns it to the job. The
job handle lives in ``JobChildProcess``: if the broker dies, Windows closes the
handle and kills every process in the job, which is the Windows counterpart of
Linux's parent-death signal. ``kill_tree`` is ``TerminateJobObject``;
``terminate_tree`` sends CTRL_BREAK_EVENT to the child's process group and falls
back to ``TerminateJobObject`` with ``STATUS_CONTROL_C_EXIT`` when there is no
console to carry it. ``wait`` runs ``Popen.wait`` on a trio worker thread.

What it does not do: start the child suspended. ``subprocess`` gives no access to
the main thread handle needed to resume it, so the child is assigned to the job
right after CreateProcess returns: a child that starts a grandchild within those
first microseconds could leave that grandchild outside the job. Nor does it
restrict the job (memory, CPU, UI) or allow breakaway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import trio

from transports._interface import ChildControl, ChildOutput, SpawnError
from transports._windows_api import (
    CREATE_NEW_PROCESS_GROUP,
    CTRL_BREAK_EVENT,
    JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    PROCESS_SET_QUOTA,
    PROCESS_TERMINATE,
    STATUS_CONTROL_C_EXIT,
    Win32Api,
    Win32Error,
)
from transports._windows_channel import PipeChildControl

logger = logging.getLogger(__name__)

#: Exit status of processes killed by ``kill_tree`` (what ``Popen.kill`` uses too).
KILL_EXIT_CODE = 1

#: Exit status used by ``terminate_tree``'s fallback, the status of a console
#: process stopped by Ctrl+C/Ctrl+Break, so logs can tell it from a kill.
TERMINATE_EXIT_CODE = STATUS_CONTROL_C_EXIT


class PopenLike(Protocol):
    """The part of ``subprocess.Popen`` that ``JobChildProcess`` uses."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


#: Starts a process: ``(argv, env, cwd, creationflags, inherited_handles)``.
PopenFactory = Callable[
    [Sequence[str], Mapping[str, str], "str | None", int, Sequence[int]], PopenLike
]


def popen_with_handle_list(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    creationflags: int,
    inherited_handles: Sequence[int],
) -> PopenLike:
    """``subprocess.Popen`` that lets exactly ``inherited_handles`` (and stdio) be inherited.

    Windows only. The handles must be inheritable for the duration of the call.
    """
    if sys.platform != "win32":
        raise SpawnError("Windows transport used on a non-Windows platform")
    startupinfo = subprocess.STARTUPINFO()
    startupinfo.lpAttributeList = {"handle_list": list(inherited_handles)}
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        close_fds=True,
        creationflags=creationflags,
        startupinfo=startupinfo,
    )


def create_kill_on_close_job(api: Win32Api) -> int:
    """A new job object whose processes all die when its last handle closes.

    Raises ``Win32Error``; the job handle is closed if configuring it fails.
    """
    job = api.create_job_object()
    try:
        info = JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        api.set_information_job_object(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, info)
    except BaseException:
        api.close_handle_quietly(job)
        raise
    return job


def assign_to_job(api: Win32Api, job: int, pid: int) -> None:
    """Open process ``pid`` for SET_QUOTA|TERMINATE and assign it to ``job``.

    The pid cannot have been reused: the Popen object still holds a handle to the
    process. The process handle is always closed. Raises ``Win32Error``.
    """
    process = api.open_process(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, pid)
    try:
        api.assign_process_to_job_object(job, process)
    finally:
        api.close_handle_quietly(process)


class JobChildProcess:
    """A backend in its own job object and console process group (``ChildProcess``).

    The job handle is closed (killing anything still in the job, such as
    grandchildren) once ``wait`` has seen the child exit, or by ``close``.
    """

    def __init__(self, api: Win32Api, popen: PopenLike, job: int) -> None:
        self._api = api
        self._popen = popen
        self._job: int | None = job

    def __repr__(self) -> str:
        return f"<JobChildProcess pid={self.pid} returncode={self._popen.returncode}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (polls without blocking)."""
        return self._popen.poll()

    @property
    def output(self) -> ChildOutput | None:
        """Always ``None``: on Windows a backend inherits the broker's stdout and stderr."""
        return None

    async def wait(self) -> int:
        """Wait for the child to exit (Popen.wait on a worker thread) and return its status.

        Afterwards the job handle is closed, so processes the child left behind
        die with it. Cancellation: the wait is abandoned and the child is left
        alone (the worker thread finishes when the child exits).
        """
        if self._popen.poll() is None:
            await trio.to_thread.run_sync(self._popen.wait, abandon_on_cancel=True)
        code = self._popen.poll()
        assert code is not None
        self.close()
        return code

    def terminate_tree(self) -> None:
        """Ask the child's process group to stop (CTRL_BREAK_EVENT). Idempotent.

        Without a shared console the event cannot be delivered; then every process
        in the job is terminated with ``TERMINATE_EXIT_CODE``.
        """
        if self._popen.poll() is not None:
            return
        try:
            self._popen.send_signal(CTRL_BREAK_EVENT)
        except (OSError, ValueError) as exc:
            logger.debug("CTRL_BREAK_EVENT to %d failed (%s); terminating the job", self.pid, exc)
            self._terminate_job(TERMINATE_EXIT_CODE)

    def kill_tree(self) -> None:
        """TerminateJobObject: kill the child and everything in its job. Idempotent."""
        self._terminate_job(KILL_EXIT_CODE)

    def _terminate_job(self, exit_code: int) -> None:
        job = self._job
        if job is None:
            # The job is already closed, which killed whatever was in it.
            return
        try:
            self._api.terminate_job_object(job, exit_code)
        except Win32Error as exc:
            logger.warning("TerminateJobObject for %d failed: %s; killing the child", self.pid, exc)
            if self._popen.poll() is None:
                with contextlib.suppress(OSError):
                    self._popen.kill()

    def close(self) -> None:
        """Close the job handle (idempotent); anything still in the job is killed."""
        job, self._job = self._job, None
        if job is not None:
            self._api.close_handle_quietly(job)


async def spawn_job_child(
    api: Win32Api,
    argv: Sequence[str],
    env: Mapping[str, str],
    control: ChildControl,
    *,
    cwd: str | None = None,
    popen_factory: PopenFactory = popen_with_handle_list,
) -> JobChildProcess:
    """Start ``argv`` in a kill-on-close job with the control pipe end of ``control``.

    The child's environment is exactly ``env`` plus ``control.env``. The control
    handle is made inheritable just for the spawn and the broker's copy is closed
    whatever happens. Raises ``SpawnError`` (naming ``argv[0]``) when the job
    cannot be set up, the program cannot be started (nothing is left running), or
    the child cannot be put in the job (the child is killed).

    Cancellation: if cancelled before the spawn, nothing is started (the control
    end is still closed); once the child exists the call completes.
    """
    if not isinstance(control, PipeChildControl):
        raise TypeError(f"spawn_child needs the ChildControl of open_control_pair, got {control!r}")
    job: int | None = None
    try:
        if not argv:
            raise SpawnError("cannot start a child: argv is empty")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            job = create_kill_on_close_job(api)
            api.set_handle_inheritable(control.handle, True)
        except Win32Error as exc:
            raise SpawnError(f"cannot prepare the job object for {argv[0]!r}: {exc}") from exc
        full_env = {**env, **control.env}
        try:
            popen = popen_factory(
                argv,
                full_env,
                os.fspath(cwd) if cwd is not None else None,
                CREATE_NEW_PROCESS_GROUP,
                (control.handle,),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
        try:
            assign_to_job(api, job, popen.pid)
        except Win32Error as exc:
            with contextlib.suppress(OSError):
                popen.kill()
            raise SpawnError(
                f"started {argv[0]!r} (pid {popen.pid}) but could not put it in its job "
                f"object, so it was killed: {exc}"
            ) from exc
    except BaseException:
        if job is not None:
            api.close_handle_quietly(job)
        raise
    finally:
        control.close()
    assert job is not None
    child = JobChildProcess(api, popen, job)
    control.parent.set_peer_pid(child.pid)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return child
