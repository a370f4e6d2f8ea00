"""Cancellation leaves nothing behind: no fd, token, task or child process."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import trio

import rpbroker
import transports
from rpbroker.client import hello_frame
from rpbroker.events import EventKind

from .support import Workspace, child_pids, fd_count, round_trip, wait_for_event


def assert_broker_clean(broker: rpbroker.Broker) -> None:
    assert len(broker.handoff.acks) == 0
    assert len(broker.handoff.tokens) == 0
    assert broker.connections_open == 0


async def test_client_cancelled_during_hello_read(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        # Warm up so the backend exists and the fd baseline includes it.
        async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path, hello_skip=False):
            pass
        await broker.wait_connections_closed()
        baseline = fd_count()
        stream = await transports.connect(broker.socket_path)
        await stream.send_all(b"\x01\x40\x00\x00")  # half a header, then the client leaves
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await broker.wait_connections_closed()
        assert fd_count() == baseline
        assert_broker_clean(broker)


async def test_client_cancelled_during_spawn_wait_does_not_cancel_the_spawn(
    workspace: Workspace,
) -> None:
    gate = workspace.root / "gate"
    os.mkfifo(gate, 0o600)
    workspace.add_service("slow", mode="wait-gate", env={"RPB_TEST_GATE": str(gate)})
    async with rpbroker.open_broker(workspace.config()) as broker:
        with trio.fail_after(30):
            baseline = fd_count()
            async with trio.open_nursery() as nursery:
                waiting = trio.CancelScope()

                async def client() -> None:
                    with waiting:
                        await rpbroker.open_connection("slow", "1.0.0", broker=broker.socket_path)
                    assert waiting.cancelled_caught

                nursery.start_soon(client)
                await wait_for_event(broker, EventKind.SPAWNING)
                waiting.cancel()
            # The spawn goes on for others: open the gate and a second client gets it.
            await trio.to_thread.run_sync(_open_gate, gate)
            async with rpbroker.connect("slow", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"late") == b"late"
            spawned = [e for e in broker.recent_events() if e.kind is EventKind.SPAWNING]
            assert len(spawned) == 1
            await broker.wait_connections_closed()
            assert_broker_clean(broker)
            # The backend's control channel, process handle, pidfd and the read
            # ends of its stdout and stderr pipes are the only new descriptors.
            assert fd_count() <= baseline + 5


async def test_client_leaving_during_spawn_wait_frees_its_hello_at_once(
    workspace: Workspace,
) -> None:
    gate = workspace.root / "gate"
    os.mkfifo(gate, 0o600)
    workspace.add_service("slow", mode="wait-gate", env={"RPB_TEST_GATE": str(gate)})
    async with rpbroker.open_broker(workspace.config(hello_wait_timeout_s=60)) as broker:
        with trio.fail_after(30):
            stream = await transports.connect(broker.socket_path)
            await stream.send_all(hello_frame("slow", "1.0.0", handoff=False))
            await wait_for_event(broker, EventKind.SPAWNING)
            await stream.aclose()
            # The broker notices the hang-up while the spawn is still held at the
            # gate: its Hello task ends long before the 60 s wait would.
            await broker.wait_connections_closed()
            dropped = [e for e in broker.recent_events() if e.kind is EventKind.PEER_DROPPED]
            assert [e.reason for e in dropped] == [
                "client left while its Hello waited for the backend"
            ]
            await trio.to_thread.run_sync(_open_gate, gate)
            async with rpbroker.connect("slow", "1.0.0", broker=broker.socket_path) as routed:
                assert await round_trip(routed, b"after") == b"after"
            spawned = [e for e in broker.recent_events() if e.kind is EventKind.SPAWNING]
            assert len(spawned) == 1


def _open_gate(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"x")


async def test_client_cancelled_during_handoff_wait(workspace: Workspace) -> None:
    workspace.add_service("stuck", mode="never-ack")
    config = workspace.config(ack_deadline_s=0.5, handoff_adopt_window_s=0.3)
    async with rpbroker.open_broker(config) as broker:
        with trio.fail_after(30):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def client() -> None:
                        await rpbroker.open_connection(
                            "stuck",
                            "1.0.0",
                            broker=broker.socket_path,
                            handoff_ready_timeout_s=60,
                        )

                    nursery.start_soon(client)
                    await wait_for_event(broker, EventKind.HANDOFF_FALLBACK)
                    scope.cancel()
            assert scope.cancelled_caught
            await broker.wait_connections_closed()
            assert_broker_clean(broker)


async def test_cancelling_the_embedding_scope_with_clients_connected(
    echo_workspace: Workspace,
) -> None:
    baseline_fds = fd_count()
    assert child_pids() == set()
    socket = Path(echo_workspace.socket)
    with trio.fail_after(30):
        streams: list[rpbroker.BrokeredStream] = []
        with trio.CancelScope() as scope:
            # Cancellation drains like a requested shutdown; keep the drain short
            # because these clients hold their connections open.
            async with rpbroker.open_broker(echo_workspace.config(drain_timeout_s=0.5)) as broker:
                for handoff in (True, False, True):
                    stream = await rpbroker.open_connection(
                        "echo",
                        "1.0.0",
                        broker=broker.socket_path,
                        handoff=handoff,
                        hello_skip=False,
                    )
                    assert await round_trip(stream, b"held") == b"held"
                    streams.append(stream)
                # One backend (the other child is the process-group reaper).
                backends = {handle.pid for handle in broker.backends}
                assert len(backends) == 1 and backends <= child_pids()
                # A Hello in flight too: a raw client that never finishes its frame.
                raw = await transports.connect(broker.socket_path)
                await raw.send_all(b"\x01")
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert child_pids() == set(), "no backend outlives the broker"
        assert not socket.exists(), "the socket file is removed"
        for stream in streams:
            # The backend was killed, so every routed connection sees EOF or a reset.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(10) == b""
            await stream.aclose()
        await raw.aclose()
    assert fd_count() == baseline_fds


async def test_leaving_open_broker_normally_quiesces_backends(echo_workspace: Workspace) -> None:
    with trio.fail_after(30):
        async with rpbroker.open_broker(echo_workspace.config()) as broker:
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"x") == b"x"
            pid = next(iter(broker.backends)).pid
        events = [e.kind for e in broker.recent_events()]
    assert EventKind.DRAINING in events
    assert EventKind.STOPPED in events
    assert EventKind.CRASHED not in events
    assert child_pids() == set()
    assert not Path(f"/proc/{pid}").exists() or pid not in child_pids()
