"""Graceful shutdown, a killed broker and restarts, with real processes and signals.

SPEC §7/§9: SIGTERM stops accepting, refuses unfinished Hellos with SHUTTING_DOWN,
leaves routed connections alone while backends drain, cancels partial spawns, then
removes the socket with no backend left. A broker killed with SIGKILL takes its
backends with it (parent-death signal) and a restarted broker binds again after
removing only its own stale socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest
import trio

import rpbroker
import transports
from rpbroker.client import hello_frame
from rpbroker.events import EventKind
from rpbroker.wire import HelloReply
from rpbroker.wire.codes import AdminVerb, RefusalCode
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body

from .support import Workspace, child_pids, round_trip
from .test_e2e_supervision_helpers import (
    admin_exchange,
    cli_json,
    pid_gone,
    run_cli,
    start_serve,
    wait_pids_gone,
    watch_events,
)


async def assert_closed_by_peer(stream: trio.abc.Stream) -> None:
    """The other end is gone: EOF, or a reset."""
    with contextlib.suppress(trio.BrokenResourceError):
        assert await stream.receive_some(100) == b""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_on_rpbroker_serve_drains_everything_and_exits_0(
    workspace: Workspace, signum: signal.Signals
) -> None:
    workspace.add_service("echo")
    workspace.add_service("other")
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace, "--drain-timeout", "1")
            endpoint = serve.socket
            handed = await rpbroker.open_connection("echo", "1.0.0", broker=endpoint)
            reconnected = await rpbroker.open_connection(
                "other", "1.0.0", broker=endpoint, handoff=False
            )
            assert handed.route is rpbroker.Route.HANDOFF
            assert reconnected.route is rpbroker.Route.RECONNECT
            assert await round_trip(handed, b"h") == b"h"
            assert await round_trip(reconnected, b"r") == b"r"
            # A Hello still in flight: half a frame header, never finished.
            unfinished = await transports.connect(endpoint)
            await unfinished.send_all(b"\x01\x40")

            status = await cli_json("status", "--socket", endpoint)
            assert status["broker_pid"] == serve.process.pid
            pids = sorted(row["pid"] for row in status["backends"])
            assert len(pids) == 2 and all(not pid_gone(pid) for pid in pids)

            serve.process.send_signal(signum)
            assert await serve.process.wait() == 0
        assert serve.count(f"{signum.name}: shutting down") == 1
        assert not Path(endpoint).exists(), "the socket file is removed"
        assert all(pid_gone(pid) for pid in pids), "no backend outlives the broker"
        assert list(workspace.runtime.iterdir()) == [], "no backend endpoint is left behind"
        for stream in (handed, reconnected, unfinished):
            await assert_closed_by_peer(stream)
            await stream.aclose()
        with pytest.raises(rpbroker.BrokerUnavailableError):
            await rpbroker.open_connection("echo", "1.0.0", broker=endpoint, hello_skip=False)


async def test_sigkill_on_the_broker_takes_its_backends_and_a_restart_binds_again(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace)
            async with rpbroker.connect("echo", "1.0.0", broker=serve.socket) as stream:
                assert await round_trip(stream, b"one") == b"one"
            status = await cli_json("status", "--socket", serve.socket)
            [backend_pid] = [row["pid"] for row in status["backends"]]

            serve.process.kill()
            assert await serve.process.wait() == -signal.SIGKILL
            # The backend is not our child: the kernel's parent-death signal must end it.
            with trio.fail_after(10):
                await wait_pids_gone([backend_pid])
            stale = Path(serve.socket)
            assert stale.is_socket(), "SIGKILL left the broker's socket file behind"

            again = await start_serve(nursery, workspace)
            assert again.socket == serve.socket
            ready = await run_cli("readyz", "--socket", again.socket)
            assert (ready.returncode, ready.stdout) == (0, "ready\n")
            # The cached endpoint of the dead backend is stale: the client recovers.
            async with rpbroker.connect("echo", "1.0.0", broker=again.socket) as stream:
                assert await round_trip(stream, b"two") == b"two"
            status = await cli_json("status", "--socket", again.socket)
            [new_pid] = [row["pid"] for row in status["backends"]]
            assert new_pid != backend_pid
            again.process.send_signal(signal.SIGTERM)
            assert await again.process.wait() == 0
        assert pid_gone(new_pid)


async def test_a_second_broker_never_takes_over_a_live_socket(workspace: Workspace) -> None:
    workspace.add_service("echo")
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            serve = await start_serve(nursery, workspace)
            inode = os.stat(serve.socket).st_ino
            second = await run_cli(
                "serve", "--socket", serve.socket, "--services", str(workspace.services),
                "--runtime-dir", str(workspace.runtime),
            )  # fmt: skip
            assert second.returncode != 0
            assert "in use" in second.stderr, second.stderr
            assert os.stat(serve.socket).st_ino == inode, "the live socket was not replaced"
            reply = await admin_exchange(serve.socket, AdminVerb.HEALTHZ)
            assert reply.body == "ok\n"
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    # An operator error gets a one-line message naming the path, like every other
    # CLI failure ("rpbroker: ..."), not an exception-group traceback.
    assert "Traceback" not in second.stderr, second.stderr
    assert f"rpbroker: {serve.socket} is in use" in second.stderr


async def test_shutdown_refuses_unfinished_hellos_and_leaves_routed_connections_alone(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(drain_timeout_s=20)) as broker:
            held = await rpbroker.open_connection("echo", "1.0.0", broker=broker.socket_path)
            assert held.route is rpbroker.Route.HANDOFF
            assert await round_trip(held, b"before") == b"before"
            pid = next(iter(broker.backends)).pid
            # A Hello that started before the shutdown and finishes during it.
            data = hello_frame("echo", "1.0.0", handoff=False, request_id=77)
            late = await transports.connect(broker.socket_path)
            await late.send_all(data[:3])
            async with watch_events(broker) as watch:
                broker.request_shutdown()
                await watch.wait_for(EventKind.DRAINING)
                assert not broker.accepting
                await late.send_all(data[3:])
                frame = decode_frame(await read_frame_body(late, MAX_FRAME_BYTES))
                assert frame.request_id == 77
                refused = decode(HelloReply, frame.payload).refused
                assert RefusalCode(refused.code) is RefusalCode.SHUTTING_DOWN
                assert refused.reason == "broker is shutting down"
                await late.aclose()
                # The routed connection belongs to the draining backend: still served.
                assert await round_trip(held, b"during") == b"during"
                assert not Path(broker.socket_path).exists(), "no new connections"
                # The backend exits as soon as its last connection is done.
                await held.aclose()
                await broker.wait_stopped()
            stopped = watch.of(EventKind.STOPPED)
            assert [(e.pid, e.details["status"]) for e in stopped] == [(pid, 0)]
            assert not watch.of(EventKind.CRASHED)
            kinds = [e.kind for e in watch.events]
            assert kinds.index(EventKind.BROKER_STOPPING) < kinds.index(EventKind.DRAINING)
            assert kinds[-1] is EventKind.BROKER_STOPPED
    assert child_pids() == set()


async def test_shutdown_cancels_a_partial_spawn_and_its_waiting_hello(
    workspace: Workspace,
) -> None:
    gate = workspace.root / "gate"
    os.mkfifo(gate, 0o600)
    workspace.add_service("slow", mode="wait-gate", env={"RPB_TEST_GATE": str(gate)})
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(drain_timeout_s=0.5)) as broker:
            async with watch_events(broker) as watch, trio.open_nursery() as nursery:
                outcome: list[BaseException] = []

                async def waiting_client() -> None:
                    try:
                        await rpbroker.open_connection("slow", "1.0.0", broker=broker.socket_path)
                    except rpbroker.RefusedError as exc:
                        outcome.append(exc)

                nursery.start_soon(waiting_client)
                spawning = await watch.wait_for(EventKind.SPAWNING)
                handle = next(iter(broker.backends))
                assert handle.status == "spawning"
                assert handle.pid > 0, "the backend process exists, not yet ready"
                await broker.shutdown()
            [refusal] = outcome
            assert isinstance(refusal, rpbroker.RefusedError)
            assert refusal.code is RefusalCode.SHUTTING_DOWN
            assert spawning.service_name == "slow"
            assert handle.exited.is_set()
            assert pid_gone(handle.pid)
            assert not watch.of(EventKind.RUNNING)
            assert not watch.of(EventKind.CRASHED)
    assert child_pids() == set()


@pytest.mark.parametrize("occupant", ["regular-file", "dead-socket-of-another-user"])
async def test_a_restarted_broker_removes_only_its_own_stale_socket(
    workspace: Workspace, occupant: str
) -> None:
    path = Path(workspace.socket)
    if occupant == "regular-file":
        path.write_bytes(b"not a socket")
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(path))
        os.chown(path, 4242, -1)
    before = path.lstat()
    with trio.fail_after(20):
        result = await run_cli(
            "serve", "--socket", str(path), "--services", str(workspace.services),
            "--runtime-dir", str(workspace.runtime),
        )  # fmt: skip
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert "refusing to replace it" in result.stderr
    after = path.lstat()
    assert (after.st_ino, after.st_uid, after.st_mode) == (
        before.st_ino,
        before.st_uid,
        before.st_mode,
    )


async def test_an_insecure_runtime_directory_refuses_to_start_with_the_fix(
    workspace: Workspace,
) -> None:
    workspace.runtime.chmod(0o755)
    with trio.fail_after(20):
        result = await run_cli(
            "serve", "--socket", workspace.socket, "--services", str(workspace.services),
            "--runtime-dir", str(workspace.runtime),
        )  # fmt: skip
    assert result.returncode != 0
    assert f"{workspace.runtime}: has mode 0755" in result.stderr
    assert f"run: chmod 700 {workspace.runtime}" in result.stderr
    assert not Path(workspace.socket).exists()
