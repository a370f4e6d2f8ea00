"""The sweep with real child processes and real sockets, on the real clock."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from rpbroker.testing import (
    CountedTasks,
    LeakedChild,
    LeakedFd,
    OutcomeKind,
    SampleSteps,
    assert_sweep_clean,
    sweep_cancellation,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="children are listed from /proc")

#: Bound on each test: a few dozen short-lived Python children, on a loaded machine.
HANG_GUARD_S = 60
#: A child that exits at once, and one that waits for its stdin to close.
QUICK_CHILD = [sys.executable, "-c", "pass"]
WAITING_CHILD = [sys.executable, "-c", "import sys; sys.stdin.read()"]


async def test_run_process_reaps_its_child_wherever_it_is_cut() -> None:
    async def runs_a_child() -> None:
        await trio.run_process(QUICK_CHILD)

    with trio.fail_after(HANG_GUARD_S):
        report = await assert_sweep_clean(runs_a_child)
    assert report.total_steps is not None and report.total_steps >= 2
    assert report.totals()[OutcomeKind.CANCELLED] >= 1


async def test_a_child_left_running_on_cancel_is_reported_with_its_pid() -> None:
    async def forgets_its_child_on_cancel() -> None:
        process = await trio.lowlevel.open_process(WAITING_CHILD, stdin=subprocess.PIPE)
        assert process.stdin is not None
        await trio.lowlevel.checkpoint()  # a cut here leaves the child waiting for its stdin
        await process.stdin.aclose()
        await process.wait()

    with trio.fail_after(HANG_GUARD_S):
        report = await sweep_cancellation(forgets_its_child_on_cancel)
    failure = report.first_failure
    assert failure is not None and failure.cut_at is not None
    children = [leak for leak in failure.leaks if isinstance(leak, LeakedChild)]
    try:
        assert len(children) == 1
        assert children[0].command.endswith("sys.stdin.read()")
        # Its stdin pipe is left open too.
        assert any(isinstance(leak, LeakedFd) and "pipe:" in leak.target for leak in failure.leaks)
        assert f"child process {children[0].pid} (" in report.describe()
    finally:
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(os.waitpid, child.pid, 0)


@pytest.fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[str]:
    """A Unix-socket echo server in the test (its tasks are not the sweep's)."""
    path = str(tmp_path / "echo.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)

    async def echo(stream: trio.SocketStream) -> None:
        # A client cut mid-exchange closes with bytes unread: a reset here.
        with contextlib.suppress(trio.BrokenResourceError):
            async with stream:
                while data := await stream.receive_some():
                    await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, echo, [listener])
        yield path
        nursery.cancel_scope.cancel()


async def test_a_socket_client_that_closes_on_cancel_is_clean(echo_server: str) -> None:
    async def round_trip() -> None:
        async with await trio.open_unix_socket(echo_server) as stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"

    with trio.fail_after(HANG_GUARD_S):
        report = await assert_sweep_clean(round_trip, counted=CountedTasks.WHOLE_RUN)
    assert report.total_steps is not None and report.total_steps >= 3


async def test_a_socket_client_that_leaks_on_cancel_is_caught(echo_server: str) -> None:
    kept: list[trio.SocketStream] = []

    async def leaky_round_trip() -> None:
        stream = await trio.open_unix_socket(echo_server)
        kept.append(stream)
        await stream.send_all(b"ping")
        await stream.receive_some(4)
        await stream.aclose()

    try:
        with trio.fail_after(HANG_GUARD_S):
            report = await sweep_cancellation(
                leaky_round_trip, steps=SampleSteps(every_up_to=3, stride=2)
            )
    finally:
        for stream in kept:
            await stream.aclose()
    failure = report.first_failure
    assert failure is not None
    assert any(
        isinstance(leak, LeakedFd) and leak.target.startswith("socket:[") for leak in failure.leaks
    )
