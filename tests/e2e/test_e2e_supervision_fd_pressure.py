"""Descriptor exhaustion on a real ``rpbroker serve`` process (SPEC §9).

The broker runs with a lowered RLIMIT_NOFILE (set from outside with ``prlimit``
once it serves) and its descriptor table is filled with idle connections that
send nothing. Linux allocates the descriptor before it takes a connection off
the queue, so the broker's next ``accept`` fails with EMFILE as soon as its table
is full, whether or not anyone is waiting. Every step synchronises on the
broker's own events (its log lines) or on its replies, never on time:

1. after each idle connection, an admin STATUS probe either gets its reply with
   ``demoted: false`` or the broker logs its first ``fd-pressure`` event: the
   table is full (the probe took the last descriptor, or waits in the backlog);
2. closing one idle connection gives the probe its answer: admin still works
   while demoted, and says ``fd_pressure.demoted``;
3. a Hello then gets FD_PRESSURE with ``retry_after_ms`` 1000;
4. once the idle connections are closed, good accepts (three in a row) clear the
   demotion (``fd-pressure-cleared``) and a Hello is served normally.

A second test leaves the broker two descriptors and asks for a backend: the spawn
cannot get its descriptors, which must cost one refusal, not the broker.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

import pytest
import trio

import rpbroker
import transports
from rpbroker.wire import AdminReply
from rpbroker.wire.codes import AdminVerb, RefusalCode

from .support import Workspace, round_trip
from .test_e2e_supervision_helpers import (
    ServeProcess,
    admin_exchange,
    admin_frame,
    json_body,
    read_admin_reply,
    start_serve,
)

#: The first demotion of an episode, and its end, as the broker logs them.
DEMOTED = "logger=rpbroker.events event=fd-pressure "
CLEARED = "logger=rpbroker.events event=fd-pressure-cleared"
#: Free descriptors left to the broker when its limit is lowered.
HEADROOM = 6


async def reply_or_demotion(serve: ServeProcess, probe: trio.abc.Stream) -> AdminReply | None:
    """The probe's reply, or None once the broker reports it ran out of descriptors.

    Only readability takes part in the race, so losing it never drops reply bytes.
    """
    assert isinstance(probe, trio.SocketStream)
    answered = False
    async with trio.open_nursery() as race:

        async def readable() -> None:
            nonlocal answered
            await trio.lowlevel.wait_readable(probe.socket)
            answered = True
            race.cancel_scope.cancel()

        async def demoted() -> None:
            await serve.wait_for_line(DEMOTED)
            race.cancel_scope.cancel()

        race.start_soon(readable)
        race.start_soon(demoted)
    return await read_admin_reply(probe) if answered else None


async def lower_descriptor_limit(serve: ServeProcess) -> tuple[int, int]:
    """Leave the broker ``HEADROOM`` free descriptors; return its original limit."""
    pid = serve.process.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (highest + 1 + HEADROOM, original[1]))
    return original


async def fill_descriptor_table(
    serve: ServeProcess,
) -> tuple[list[trio.abc.Stream], trio.abc.Stream, AdminReply | None]:
    """Open idle connections until the broker runs out of descriptors.

    Returns the idle connections (all accepted by the broker), the admin STATUS
    request sent when it ran out, and its reply if it already came: the request
    took the broker's last descriptor (then it was answered after the demotion)
    or it waits in the backlog, the only connection there.
    """
    idle: list[trio.abc.Stream] = []
    while True:
        assert len(idle) <= 4 * HEADROOM, "the broker never ran out of descriptors"
        idle.append(await transports.connect(serve.socket))
        probe = await transports.connect(serve.socket)
        await probe.send_all(admin_frame(AdminVerb.STATUS, json_output=True))
        reply = await reply_or_demotion(serve, probe)
        if reply is None or json_body(reply, "status")["fd_pressure"]["demoted"]:
            await serve.wait_for_line(DEMOTED)
            return idle, probe, reply
        # Closed by the broker: its descriptor is free again before the next round.
        assert await probe.receive_some(1) == b""
        await probe.aclose()


async def status_once_restored(serve: ServeProcess) -> dict[str, Any]:
    """Ask for STATUS until the broker is no longer demoted; return that status.

    Each request is an accept: once descriptors are free, three in a row are good.
    """
    for _ in range(10):
        reply = await admin_exchange(serve.socket, AdminVerb.STATUS, json_output=True)
        status = json_body(reply, "status")
        if not status["fd_pressure"]["demoted"]:
            return status
    raise AssertionError("the demotion never cleared")


async def test_fd_exhaustion_demotes_admin_still_answers_and_three_accepts_restore(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(
                nursery, workspace, "--hello-timeout", "300", log_level="INFO"
            )
            original = await lower_descriptor_limit(serve)
            idle, waiting, reply = await fill_descriptor_table(serve)
            assert serve.count(DEMOTED) == 1

            # One descriptor comes back: the admin request is answered either way.
            await idle.pop(0).aclose()
            if reply is None:
                reply = await read_admin_reply(waiting)
            status = json_body(reply, "status")
            assert status["fd_pressure"]["demoted"] is True
            assert status["fd_pressure"]["episodes"] == 1
            assert status["fd_pressure"]["refusals"] == 0
            assert status["accepting_hello"] is True
            assert await waiting.receive_some(1) == b""
            await waiting.aclose()

            with pytest.raises(rpbroker.RefusedError) as info:
                await rpbroker.open_connection(
                    "echo", "1.0.0", broker=serve.socket, hello_skip=False
                )
            assert info.value.code is RefusalCode.FD_PRESSURE
            assert info.value.retry_after_ms == 1000
            assert "file descriptors" in info.value.reason

            for stream in idle:
                await stream.aclose()
            # The broker frees those descriptors as it notices the closes; from then
            # on every accept is good, and three in a row clear the demotion.
            status = await status_once_restored(serve)
            await serve.wait_for_line(CLEARED)
            assert status["fd_pressure"] == {"demoted": False, "episodes": 1, "refusals": 1}

            # Spawning needs a few descriptors more than the lowered limit left.
            resource.prlimit(serve.process.pid, resource.RLIMIT_NOFILE, original)
            async with rpbroker.connect("echo", "1.0.0", broker=serve.socket) as stream:
                assert await round_trip(stream, b"served") == b"served"
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
        assert serve.count(DEMOTED) == 1
        assert serve.count(CLEARED) == 1


def free_descriptors(pid: int) -> int:
    """Descriptors ``pid`` may still open (read once, while it waits for input)."""
    soft, _hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    return soft - len([fd for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) < soft])


async def test_running_out_of_descriptors_while_spawning_refuses_and_the_broker_survives(
    workspace: Workspace,
) -> None:
    # Accepting the Hello takes one of the broker's last two descriptors; starting
    # the backend needs more (a control socketpair, /dev/null, a pipe, a pidfd).
    # That must end in a typed refusal for this Hello with the broker still
    # serving, not in the loss of the broker and of every backend it supervises.
    workspace.add_service("echo")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace, "--hello-timeout", "300")
            pid = serve.process.pid
            original = await lower_descriptor_limit(serve)
            # Hold idle connections until exactly two descriptors are left. An admin
            # round trip behind them proves the broker accepted them all (one accept
            # loop, first come first served) and never ran out while doing so.
            idle = [
                await transports.connect(serve.socket) for _ in range(free_descriptors(pid) - 2)
            ]
            assert (await admin_exchange(serve.socket, AdminVerb.HEALTHZ)).body == "ok\n"
            assert free_descriptors(pid) == 2
            assert serve.count(DEMOTED) == 0

            outcome: rpbroker.BrokerError | None = None
            try:
                await rpbroker.open_connection(
                    "echo", "1.0.0", broker=serve.socket, hello_skip=False, handoff=False
                )
            except rpbroker.BrokerError as exc:
                outcome = exc
            assert isinstance(outcome, rpbroker.RefusedError), f"not a refusal: {outcome!r}"
            assert outcome.code in (RefusalCode.BACKEND_SPAWN_FAILED, RefusalCode.FD_PRESSURE)
            assert outcome.reason, "the refusal says why"
            assert outcome.retry_after_ms is not None and outcome.retry_after_ms > 0
            assert serve.process.returncode is None, "the broker survived"
            assert (await admin_exchange(serve.socket, AdminVerb.HEALTHZ)).body == "ok\n"

            # With descriptors back, the same service is served.
            for held in idle:
                await held.aclose()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
            # Answering the refusal may have taken the broker's last descriptor for a
            # moment (a demotion); good accepts end it before the next Hello.
            await status_once_restored(serve)
            async with rpbroker.connect(
                "echo", "1.0.0", broker=serve.socket, hello_skip=False
            ) as stream:
                assert await round_trip(stream, b"served") == b"served"
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
