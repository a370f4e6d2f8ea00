"""The blocking client against a real broker and real backend processes, from worker threads.

Each client call runs in ``trio.to_thread.run_sync`` (a thread with no trio run),
while the broker runs in the test's trio run. A handed-off socket is recognised by
its peer address: it is still the connection made to the broker's socket, whereas
reconnect and Hello-skip sockets are connected to the backend's endpoint.
"""

from __future__ import annotations

import functools
import gc
import os
import selectors
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

import rpbroker
from rpbroker.blocking import BlockingClient, BrokeredSocket
from rpbroker.endpoint_cache import EndpointCache
from rpbroker.events import EventKind
from rpbroker.wire.codes import RefusalCode

from .support import Workspace, fd_count

#: Bound on each test's waits, seconds: spawning a backend process takes a moment
#: on a loaded machine; a hang fails here instead of at pytest's global timeout.
HANG_GUARD_S = 60
#: Handoff settings that make every fallback quick (as in test_e2e_handoff_fallback).
FAST = {"ack_deadline_s": 1.0, "handoff_adopt_window_s": 0.5}

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call in a worker thread, bounded by the hang guard."""
    with trio.fail_after(HANG_GUARD_S):
        return await trio.to_thread.run_sync(fn)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def echo_check(brokered: BrokeredSocket, initial_data: bytes) -> None:
    """The backend echoes ``initial_data`` first (exactly once), then anything else."""
    sock = brokered.socket
    assert sock.gettimeout() is None
    if initial_data:
        assert recv_exactly(sock, len(initial_data)) == initial_data
    sock.sendall(b"+more")
    assert recv_exactly(sock, 5) == b"+more"


@pytest.mark.parametrize("initial_data", [b"", b"request-1"], ids=["plain", "initial-data"])
async def test_handoff_route_returns_the_connection_the_hello_went_out_on(
    broker: rpbroker.Broker, initial_data: bytes
) -> None:
    client = BlockingClient()

    def work() -> tuple[rpbroker.Route, object, int]:
        with client.open(
            "echo", "1.0.0", broker=broker.socket_path, initial_data=initial_data
        ) as brokered:
            echo_check(brokered, initial_data)
            return brokered.route, brokered.socket.getpeername(), brokered.connection_id

    route, peer, connection_id = await in_thread(work)
    assert route is rpbroker.Route.HANDOFF
    assert peer == broker.socket_path
    assert connection_id >= 1
    # The backend ACKs the broker off the client's path: wait for the broker's side.
    with trio.fail_after(HANG_GUARD_S):
        await broker.wait_connections_closed()
    assert [e.kind for e in broker.recent_events()].count(EventKind.HANDOFF_COMPLETED) == 1


@pytest.mark.parametrize("initial_data", [b"", b"request-1"], ids=["plain", "initial-data"])
async def test_reconnect_route_connects_to_the_negotiated_backend(
    broker: rpbroker.Broker, initial_data: bytes
) -> None:
    def work() -> tuple[rpbroker.Route, object, str, str]:
        with BlockingClient().open(
            "echo", "1.0.0", broker=broker.socket_path, handoff=False, initial_data=initial_data
        ) as brokered:
            echo_check(brokered, initial_data)
            assert brokered.negotiated is not None
            return (
                brokered.route,
                brokered.socket.getpeername(),
                brokered.endpoint,
                brokered.negotiated.backend_pipe,
            )

    route, peer, endpoint, backend_pipe = await in_thread(work)
    assert route is rpbroker.Route.RECONNECT
    assert peer == endpoint == backend_pipe != broker.socket_path


async def test_hello_skip_comes_from_the_clients_own_cache(broker: rpbroker.Broker) -> None:
    client = BlockingClient()

    def open_route(
        target: BlockingClient, hello_skip: bool = True
    ) -> tuple[rpbroker.Route, object]:
        with target.open(
            "echo", "1.0.0", broker=broker.socket_path, initial_data=b"ping", hello_skip=hello_skip
        ) as brokered:
            echo_check(brokered, b"ping")
            return brokered.route, brokered.socket.getpeername()

    first = await in_thread(lambda: open_route(client))
    second = await in_thread(lambda: open_route(client))
    assert first == (rpbroker.Route.HANDOFF, broker.socket_path)
    assert second[0] is rpbroker.Route.HELLO_SKIP and second[1] != broker.socket_path
    assert len(client.cache) == 1
    # hello_skip=False negotiates again; another client has its own, empty cache.
    assert (await in_thread(lambda: open_route(client, hello_skip=False)))[0] is (
        rpbroker.Route.HANDOFF
    )
    assert (await in_thread(lambda: open_route(BlockingClient())))[0] is rpbroker.Route.HANDOFF


async def test_one_shot_connect_never_skips_the_hello(broker: rpbroker.Broker) -> None:
    def work() -> list[object]:
        peers = []
        for _ in range(2):
            with rpbroker.connect_blocking("echo", "1.0.0", broker=broker.socket_path) as sock:
                sock.sendall(b"x")
                assert recv_exactly(sock, 1) == b"x"
                peers.append(sock.getpeername())
        return peers

    assert await in_thread(work) == [broker.socket_path, broker.socket_path]


async def test_a_dead_cached_endpoint_is_forgotten_and_the_hello_follows(
    broker: rpbroker.Broker,
) -> None:
    cache = EndpointCache()
    key = (broker.socket_path, "echo", "1.0.0")
    dead = str(Path(broker.socket_path).with_name("gone.sock"))
    cache.remember(key, dead)

    def work() -> rpbroker.Route:
        with BlockingClient(cache).open(
            "echo", "1.0.0", broker=broker.socket_path, initial_data=b"once"
        ) as brokered:
            echo_check(brokered, b"once")
            return brokered.route

    assert await in_thread(work) is rpbroker.Route.HANDOFF
    entry = cache.get(key)
    assert entry is not None and entry.endpoint != dead


@pytest.mark.parametrize("mode", ["reject", "never-ack", "forged-ack"])
async def test_fallback_resends_initial_data_on_the_reconnect_route_exactly_once(
    workspace: Workspace, mode: str
) -> None:
    counter = workspace.root / "received"
    workspace.add_service("svc", mode=mode, env={"RPB_TEST_COUNTER": str(counter)})
    async with rpbroker.open_broker(workspace.config(**FAST)) as broker:

        def work() -> rpbroker.Route:
            with BlockingClient().open(
                "svc",
                "1.0.0",
                broker=broker.socket_path,
                initial_data=b"request-1",
                handoff_ready_timeout_s=1.0,
            ) as brokered:
                echo_check(brokered, b"request-1")
                return brokered.route

        assert await in_thread(work) is rpbroker.Route.RECONNECT
        with trio.fail_after(HANG_GUARD_S):
            await broker.wait_connections_closed()
        # The handed-off copy of request-1 was never served: one copy, then the rest.
        assert counter.read_bytes() == b"request-1+more"
        assert len(broker.handoff.tokens) == 0


async def test_refusals_are_the_async_clients_typed_errors(broker: rpbroker.Broker) -> None:
    client = BlockingClient()
    with pytest.raises(rpbroker.RefusedError) as unknown:
        await in_thread(lambda: client.connect("nosuch", "1.0.0", broker=broker.socket_path))
    assert unknown.value.code is RefusalCode.SERVICE_UNKNOWN
    assert unknown.value.service_name == "nosuch"
    with pytest.raises(rpbroker.RefusedError) as blocked:
        await in_thread(lambda: client.connect("echo", "0.9.0", broker=broker.socket_path))
    assert blocked.value.code is RefusalCode.VERSION_BLOCKED
    assert (blocked.value.wanted_version, blocked.value.min_version) == ("0.9.0", "1.0.0")
    assert blocked.value.retry_after_ms == 30_000
    assert len(client.cache) == 0


async def test_malformed_arguments_fail_before_any_io(workspace: Workspace) -> None:
    nowhere = str(workspace.runtime / "no-broker.sock")  # would be BrokerUnavailableError
    for service, version, argument in [("Echo", "1.0.0", "service"), ("echo", "1.0", "version")]:
        call = functools.partial(BlockingClient().connect, service, version, broker=nowhere)
        with pytest.raises(ValueError, match=f"^{argument} ") as caught:
            await in_thread(call)
        assert isinstance(caught.value, rpbroker.ConnectArgumentError)


async def test_no_broker_and_a_silent_broker_are_typed_errors(workspace: Workspace) -> None:
    nowhere = str(workspace.runtime / "no-broker.sock")
    with pytest.raises(rpbroker.BrokerUnavailableError, match="no broker at"):
        await in_thread(lambda: rpbroker.connect_blocking("echo", "1.0.0", broker=nowhere))
    silent_path = str(workspace.runtime / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(silent_path)
        silent.listen(4)  # never accepts: the Hello waits in the backlog, no reply comes
        with pytest.raises(rpbroker.ConnectTimeoutError, match=r"within 0\.3 s"):
            await in_thread(
                lambda: rpbroker.connect_blocking(
                    "echo", "1.0.0", broker=silent_path, timeout_s=0.3
                )
            )


async def test_threads_share_one_client(broker: rpbroker.Broker) -> None:
    client = BlockingClient()
    results: list[bytes] = []

    def work(index: int) -> None:
        message = f"thread-{index}".encode()
        with client.connect("echo", "1.0.0", broker=broker.socket_path) as sock:
            sock.sendall(message)
            results.append(recv_exactly(sock, len(message)))

    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(trio.to_thread.run_sync, functools.partial(work, index))
    assert sorted(results) == sorted(f"thread-{i}".encode() for i in range(8))


async def test_no_descriptor_is_left_on_any_route_or_failure(broker: rpbroker.Broker) -> None:
    client = BlockingClient()

    def every_route_and_failure() -> None:
        for options in ({}, {"hello_skip": False}, {"handoff": False}, {"initial_data": b"i"}):
            with client.connect("echo", "1.0.0", broker=broker.socket_path, **options) as sock:
                sock.sendall(b"z")
                recv_exactly(sock, 2 if options.get("initial_data") else 1)
        for service, version in [("nosuch", "1.0.0"), ("echo", "0.9.0"), ("Echo", "1.0.0")]:
            with pytest.raises((rpbroker.RefusedError, ValueError)):
                client.connect(service, version, broker=broker.socket_path)
        with pytest.raises(rpbroker.BrokerUnavailableError):
            client.connect("echo", "1.0.0", broker=broker.socket_path + ".none")

    # Warm up: the backend exists and the fd baseline includes the broker's link to it.
    await in_thread(lambda: client.connect("echo", "1.0.0", broker=broker.socket_path).close())
    with trio.fail_after(HANG_GUARD_S):
        await broker.wait_connections_closed()
    baseline = fd_count()
    with warnings.catch_warnings(record=True) as caught:
        # A socket dropped without close() is closed by the garbage collector, so
        # the fd count alone cannot see it; its ResourceWarning can.
        warnings.simplefilter("always", ResourceWarning)
        await in_thread(every_route_and_failure)
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    with trio.fail_after(HANG_GUARD_S):
        await broker.wait_connections_closed()
    assert fd_count() == baseline


def wait_for_line(process: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """Read the child's stderr until ``marker`` appears, bounded by the hang guard."""
    assert process.stderr is not None
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while marker not in seen:
            assert selector.select(timeout=HANG_GUARD_S), f"no {marker!r} yet: {seen!r}"
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, f"the broker exited before {marker!r}: {seen.decode()}"
            seen += chunk
    return seen


def test_plain_script_against_rpbroker_serve(echo_workspace: Workspace) -> None:
    # No trio run in this process at all: a script talking to the real command.
    rpbroker_command = str(Path(sys.executable).with_name("rpbroker"))
    process = subprocess.Popen(
        [
            rpbroker_command,
            "serve",
            "--socket",
            echo_workspace.socket,
            "--services",
            str(echo_workspace.services),
            "--runtime-dir",
            str(echo_workspace.runtime),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(process, b"serving on")
        baseline = fd_count()
        client = BlockingClient()
        routes = []
        for _ in range(2):
            with client.open(
                "echo", "1.0.0", broker=echo_workspace.socket, initial_data=b"script"
            ) as brokered:
                echo_check(brokered, b"script")
                routes.append(brokered.route)
        assert routes == [rpbroker.Route.HANDOFF, rpbroker.Route.HELLO_SKIP]
        assert fd_count() == baseline
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_GUARD_S) == 0
        assert process.stderr is not None
        process.stderr.close()
