"""Spawning backends into kill-on-close job objects, on fakes.

What this covers: the job object's configuration (KILL_ON_JOB_CLOSE in the
JOBOBJECT_EXTENDED_LIMIT_INFORMATION given to SetInformationJobObject, with its
size), the spawn arguments (new process group, exactly the control handle
inherited and inheritable at that moment, ``env`` plus the control variable),
assignment of the child's own process handle to the job, cleanup on every
failure, ``kill_tree``/``terminate_tree`` and ``wait`` including cancellation.

What it does not cover: CreateProcess itself, console control events, or a job
actually killing processes.
"""

from __future__ import annotations

import ctypes

import pytest
import trio
import trio.testing

from transports._interface import CONTROL_CHANNEL_ENV, SpawnError
from transports._windows import WindowsTransport
from transports._windows_api import (
    CREATE_NEW_PROCESS_GROUP,
    CTRL_BREAK_EVENT,
    ERROR_ACCESS_DENIED,
    JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    PROCESS_SET_QUOTA,
    PROCESS_TERMINATE,
    STATUS_CONTROL_C_EXIT,
)
from transports._windows_process import KILL_EXIT_CODE, JobChildProcess

from .windows_fakes import FakeIo, FakePopenFactory, FakeWindows

ARGV = ["python.exe", "-m", "backend"]


def _setup() -> tuple[FakeWindows, FakePopenFactory, WindowsTransport]:
    fake = FakeWindows()
    factory = FakePopenFactory(fake)
    return fake, factory, WindowsTransport(fake.api(), FakeIo(), popen_factory=factory)


async def test_spawn_sets_up_the_job_and_assigns_the_child() -> None:
    fake, factory, transport = _setup()
    channel, control = transport.open_control_pair()
    child_handle = control.handle
    fake.calls.clear()

    child = await transport.spawn_child(ARGV, {"A": "1"}, control, cwd="C:\\work")

    (create_job,) = fake.calls_to("CreateJobObjectW")
    assert create_job.args == (None, None)
    (limits,) = fake.calls_to("SetInformationJobObject")
    job = limits.int_arg(0)
    assert limits.args[1] == JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS
    assert limits.args[3] == ctypes.sizeof(JOBOBJECT_EXTENDED_LIMIT_INFORMATION)
    limit_flags = limits.extra["limit_flags"]
    assert isinstance(limit_flags, int) and limit_flags & JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE

    (record,) = factory.records
    assert record.argv == ARGV and record.cwd == "C:\\work"
    assert record.creationflags & CREATE_NEW_PROCESS_GROUP
    assert record.inherited_handles == [child_handle]
    assert record.inheritable_at_spawn == [True]
    assert record.env == {"A": "1", CONTROL_CHANNEL_ENV: f"handle:{child_handle}"}

    (open_call,) = fake.calls_to("OpenProcess")
    assert open_call.args == (PROCESS_SET_QUOTA | PROCESS_TERMINATE, 0, child.pid)
    (assign,) = fake.calls_to("AssignProcessToJobObject")
    process_handle = assign.args[1]
    assert assign.args[0] == job and assign.extra["pid"] == child.pid
    assert process_handle in fake.closed  # only the job keeps the child
    assert fake.handles[job].members == [child.pid]

    # The broker's copy of the child's end is gone; the job stays open with the child.
    assert child_handle in fake.closed and control.closed
    assert job in fake.handles
    assert channel.peer_pid == child.pid
    assert isinstance(child, JobChildProcess)
    factory.spawned[0].exit(0)
    assert await child.wait() == 0
    assert job in fake.closed  # closing the job kills whatever the child left behind
    await channel.aclose()


async def test_program_that_cannot_start_leaves_nothing_open() -> None:
    fake, factory, transport = _setup()
    channel, control = transport.open_control_pair()
    factory.errors.append(FileNotFoundError(2, "The system cannot find the file specified"))
    with pytest.raises(SpawnError, match=r"python\.exe"):
        await transport.spawn_child(ARGV, {}, control)
    assert control.closed
    await channel.aclose()
    assert fake.open_handles() == []


async def test_child_that_cannot_join_the_job_is_killed() -> None:
    fake, factory, transport = _setup()
    channel, control = transport.open_control_pair()
    fake.fail("AssignProcessToJobObject", ERROR_ACCESS_DENIED)
    with pytest.raises(SpawnError, match="job object"):
        await transport.spawn_child(ARGV, {}, control)
    assert factory.spawned[0].killed
    await channel.aclose()
    assert fake.open_handles() == []


async def test_job_setup_failure_starts_nothing() -> None:
    fake, factory, transport = _setup()
    channel, control = transport.open_control_pair()
    fake.fail("SetInformationJobObject", ERROR_ACCESS_DENIED)
    with pytest.raises(SpawnError):
        await transport.spawn_child(ARGV, {}, control)
    assert factory.records == []
    await channel.aclose()
    assert fake.open_handles() == []


async def test_spawn_refuses_a_foreign_control_and_empty_argv() -> None:
    _, factory, transport = _setup()

    class Other:
        @property
        def env(self) -> dict[str, str]:
            return {}

        def close(self) -> None:
            pass

    with pytest.raises(TypeError):
        await transport.spawn_child(ARGV, {}, Other())
    channel, control = transport.open_control_pair()
    with pytest.raises(SpawnError, match="empty"):
        await transport.spawn_child([], {}, control)
    assert control.closed
    await channel.aclose()
    assert factory.records == []


async def test_kill_and_terminate_tree() -> None:
    fake, factory, transport = _setup()
    channel, control = transport.open_control_pair()
    child = await transport.spawn_child(ARGV, {}, control)
    (job,) = fake.open_handles("job")
    popen = factory.spawned[0]

    child.terminate_tree()
    assert popen.signals == [CTRL_BREAK_EVENT]
    popen.signal_error = OSError("no console")
    child.terminate_tree()  # no console: terminate the job instead
    child.kill_tree()
    child.kill_tree()  # idempotent
    assert fake.handles[job].terminated_with == [
        STATUS_CONTROL_C_EXIT,
        KILL_EXIT_CODE,
        KILL_EXIT_CODE,
    ]

    popen.exit(KILL_EXIT_CODE)
    child.terminate_tree()  # after exit: nothing to signal
    assert await child.wait() == KILL_EXIT_CODE
    child.kill_tree()  # after the job closed: a no-op
    assert fake.open_handles("job") == []
    await channel.aclose()


async def test_cancelled_wait_leaves_the_child_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, factory, transport = _setup()
    channel, control = transport.open_control_pair()
    child = await transport.spawn_child(ARGV, {}, control)
    with trio.move_on_after(1) as scope:
        await child.wait()
    assert scope.cancelled_caught
    assert child.returncode is None
    assert fake.calls_to("TerminateJobObject") == []
    assert not factory.spawned[0].killed
    assert fake.open_handles("job")  # still alive, still in its job
    factory.spawned[0].exit(3)  # releases the abandoned worker thread
    assert await child.wait() == 3
    await channel.aclose()
