"""The testing kit's own pieces: in-memory control channel, fake process, launcher, fixtures."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

import rpbroker
import transports
from rpbroker import control
from rpbroker.events import EventKind
from rpbroker.launcher import BackendLauncher, LaunchRequest
from rpbroker.services import ServiceSpec
from rpbroker.testing import (
    FIRST_FAKE_PID,
    FakeBackendScript,
    FakeLauncher,
    FakeProcess,
    FakeService,
    HandoffBehaviour,
    TestBroker,
    memory_control_pair,
    open_test_broker,
)
from rpbroker.testing.pytest_plugin import TestBrokerFactory

from .conftest import LIMIT_S, exactly

TOKEN = bytes(range(16))
FRAME = control.activity_message(1, 2)


def _socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def test_memory_channel_carries_frames_both_ways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker_end, backend_end = memory_control_pair(backend_pid=4242)
    assert broker_end.peer_pid == 4242
    assert backend_end.adopt_handle_value(0, TOKEN) is None
    await broker_end.send_message(FRAME)
    message = await backend_end.receive_message(1024)
    assert message.framed == FRAME and message.passed is None
    await backend_end.send_message(FRAME)
    assert (await broker_end.receive_message(1024)).framed == FRAME
    with pytest.raises(ValueError):
        await broker_end.send_message(FRAME + b"x")
    with pytest.raises(transports.ChannelProtocolError):
        await broker_end.send_message(FRAME)
        await backend_end.receive_message(len(FRAME) - 6)
    await broker_end.aclose()
    await backend_end.aclose()


async def test_passed_connection_is_a_duplicate_paired_with_the_next_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker_end, backend_end = memory_control_pair()
    client, server = _socket_streams()
    receipt = await broker_end.pass_connection_then_send(
        server, TOKEN, lambda r: FRAME, preface=b"reply;"
    )
    assert receipt == transports.PassReceipt(handle_value=0, duplicated_handle=None)
    await server.aclose()  # the broker closes its copy right away
    message = await backend_end.receive_message(1024)
    assert message.framed == FRAME
    assert message.passed is not None and message.passed.token == TOKEN
    adopted = message.passed.stream
    await adopted.send_all(b"from-backend")
    received = b""
    while len(received) < len(b"reply;from-backend"):
        received += await client.receive_some()
    assert received == b"reply;from-backend"  # the preface came first
    await client.send_all(b"to-backend")
    assert await adopted.receive_some() == b"to-backend"
    for stream in (adopted, client):
        await stream.aclose()
    await broker_end.aclose()
    await backend_end.aclose()


async def test_pass_failures_are_typed_and_leak_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker_end, backend_end = memory_control_pair()
    client, server = _socket_streams()
    memory_stream = trio.testing.memory_stream_pair()[0]
    with pytest.raises(transports.ConnectionPassError) as failed:
        await broker_end.pass_connection(memory_stream, TOKEN)
    assert failed.value.kind is transports.PassFailure.FAILED
    with pytest.raises(ValueError):
        await broker_end.pass_connection(server, b"short")

    broker_end.fail_next_pass = transports.ConnectionPassError(
        transports.PassFailure.WOULD_BLOCK, "injected"
    )
    with pytest.raises(transports.ConnectionPassError) as failed:
        await broker_end.pass_connection_then_send(server, TOKEN, FRAME)
    assert failed.value.kind is transports.PassFailure.WOULD_BLOCK
    assert broker_end.connections_passed == 0

    # A token packet queued for a receiver that closes is closed with it.
    await broker_end.pass_connection(server, TOKEN)
    await backend_end.aclose()
    with pytest.raises(transports.ConnectionPassError) as failed:
        await broker_end.pass_connection(server, TOKEN)
    assert failed.value.kind is transports.PassFailure.BACKEND_UNAVAILABLE
    with pytest.raises(transports.ChannelClosedError):
        await broker_end.send_message(FRAME)
    with pytest.raises(transports.ChannelClosedError):
        await broker_end.receive_message(1024)
    # The only copy left is the server's own: the peer sees EOF once it closes.
    await server.aclose()
    assert await client.receive_some() == b""
    await client.aclose()
    await broker_end.aclose()


async def test_fake_process_lifecycle(autojump_clock: trio.testing.MockClock) -> None:
    await trio.sleep(2)
    process = FakeProcess()
    assert process.pid >= FIRST_FAKE_PID
    assert process.returncode is None and process.started_at == exactly(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 1)
        await trio.sleep(1)
        process.kill_tree()
    assert await process.wait() == -9
    assert process.exited_at == exactly(3)
    process.exit(0)  # idempotent: the first status wins
    process.terminate_tree()
    assert process.returncode == -9
    assert process.signals == ["SIGKILL"]  # nothing reaches an exited process

    stubborn = FakeProcess(terminate_exits=False)
    stubborn.terminate_tree()
    assert stubborn.returncode is None
    stubborn.exit(5)
    assert await stubborn.wait() == 5


async def test_fake_launcher_alone_implements_the_launcher_protocol(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    spec = ServiceSpec(service_name="svc", command=("/bin/true",), source=tmp_path / "svc.toml")
    request = LaunchRequest(
        service_name="svc",
        service_version="1.0.0",
        instance="private:svc",
        endpoint=str(tmp_path / "never-bound.sock"),  # listen=False: nothing is bound
        spec=spec,
    )
    with trio.fail_after(LIMIT_S):
        async with FakeLauncher(default=FakeBackendScript(listen=False)) as launcher:
            as_protocol: BackendLauncher = launcher
            launched = await as_protocol.launch(request)
            channel = launched.channel
            assert channel is not None
            message = await channel.receive_message(1 << 20)
            ready = control.parse(message.framed)
            assert isinstance(ready, control.ReadyNotice)
            assert ready.endpoint == request.endpoint
            fake = launcher.backend("svc")
            assert fake.ready and fake.process is launched.process
            assert channel.peer_pid == fake.pid
            await channel.aclose()  # the "broker" goes away: the fake exits 0
            assert await launched.process.wait() == 0
            await fake.wait_finished()
            assert launcher.backends == []
        with pytest.raises(RuntimeError):
            await launcher.launch(request)


async def test_rpbroker_test_broker_fixture(
    autojump_clock: trio.testing.MockClock, rpbroker_test_broker: TestBroker
) -> None:
    tb = rpbroker_test_broker
    tb.add_service("late", FakeService(idle_timeout_secs=5))
    t0 = trio.current_time()
    async with await tb.connect("late", "1.0.0", initial_data=b"hi") as stream:
        assert await stream.receive_some(2) == b"hi"
    # The backend reports activity at most once a second: the close (at t0) is
    # reported at t0 + 1, and the idle clock runs from there.
    idle = await tb.wait_event(EventKind.IDLE_QUIESCE)
    assert idle.at == exactly(t0 + 1 + 5)


async def test_rpbroker_test_broker_factory_fixture(
    autojump_clock: trio.testing.MockClock, rpbroker_test_broker_factory: TestBrokerFactory
) -> None:
    async with rpbroker_test_broker_factory({"svc": FakeBackendScript()}, drain_timeout_s=1) as tb:
        assert tb.config.drain_timeout_s == 1
        assert tb.services_dir.stat().st_mode & 0o777 == 0o700
        assert tb.runtime_dir.stat().st_mode & 0o777 == 0o700
        assert len(tb.socket_path) < 80
        negotiated = await tb.hello("svc", "1.0.0")
        assert negotiated.backend_pipe == tb.launcher.backend("svc").endpoint
        first = tb.events[0]
        assert first.kind is EventKind.BROKER_STARTED and first.index == 0
    assert not tb.runtime_dir.exists()


async def test_wait_event_sees_events_in_order_and_fails_once_the_broker_stopped(
    autojump_clock: trio.testing.MockClock, rpbroker_test_broker_factory: TestBrokerFactory
) -> None:
    async with rpbroker_test_broker_factory({"svc": FakeService(idle_timeout_secs=3600)}) as tb:
        fake = await tb.start_backend("svc", "1.0.0")
        spawning = await tb.wait_event(EventKind.SPAWNING)
        running = await tb.wait_event(EventKind.RUNNING)
        assert spawning.index < running.index and running.pid == fake.pid
        with trio.move_on_after(1):
            await tb.wait_event(EventKind.RUNNING)  # nothing new: it waits
            raise AssertionError("a second RUNNING event appeared")
    with pytest.raises(LookupError):
        await tb.wait_event(EventKind.CRASHED)


async def test_a_test_broker_leaves_no_descriptor_behind(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    services = {
        name: FakeService(script=FakeBackendScript(handoff=behaviour), idle_timeout_secs=3600)
        for name, behaviour in (
            ("adopt", HandoffBehaviour.ADOPT),
            ("reject", HandoffBehaviour.REJECT),
            ("never", HandoffBehaviour.NEVER_ACK),
            ("crash", HandoffBehaviour.CRASH),
        )
    }
    before = transports.open_fd_count()
    with trio.fail_after(LIMIT_S):
        async with open_test_broker(tmp_path, services) as tb:
            for name in services:
                with contextlib.suppress(rpbroker.BrokerError):
                    async with await tb.connect(name, "1.0.0", initial_data=b"x") as stream:
                        assert await stream.receive_some(1) == b"x"
            tb.launcher.backend("adopt").crash()
            await trio.sleep(60)
    assert transports.open_fd_count() == before
