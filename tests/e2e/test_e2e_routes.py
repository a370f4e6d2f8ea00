"""Both routes, Hello-skip and single-flight spawning, with real processes and sockets."""

from __future__ import annotations

import trio

import rpbroker
from rpbroker.client import forget_cached_endpoints
from rpbroker.events import EventKind

from .support import Workspace, round_trip


async def test_handoff_route_delivers_initial_data_once(broker: rpbroker.Broker) -> None:
    forget_cached_endpoints()
    with trio.fail_after(20):
        async with rpbroker.connect(
            "echo", "1.0.0", broker=broker.socket_path, initial_data=b"first"
        ) as stream:
            assert stream.route is rpbroker.Route.HANDOFF
            assert await round_trip(stream, b"") == b""
            data = await stream.receive_some(5)
            assert data == b"first"
            assert await round_trip(stream, b"second") == b"second"
        await broker.wait_connections_closed()
    assert len(broker.handoff.acks) == 0
    assert len(broker.handoff.tokens) == 0


async def test_reconnect_route_when_client_does_not_opt_in(broker: rpbroker.Broker) -> None:
    forget_cached_endpoints()
    with trio.fail_after(20):
        async with rpbroker.connect(
            "echo", "1.0.0", broker=broker.socket_path, handoff=False, initial_data=b"abc"
        ) as stream:
            assert stream.route is rpbroker.Route.RECONNECT
            assert stream.negotiated is not None
            assert stream.negotiated.handle_passed_token == b""
            assert await round_trip(stream, b"") == b""
            assert await stream.receive_some(3) == b"abc"


async def test_hello_skip_reuses_the_cached_endpoint(broker: rpbroker.Broker) -> None:
    forget_cached_endpoints()
    with trio.fail_after(20):
        async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as first:
            assert first.route is rpbroker.Route.HANDOFF
        async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as second:
            assert second.route is rpbroker.Route.HELLO_SKIP
            assert second.endpoint == first.endpoint
            assert await round_trip(second, b"skip") == b"skip"


async def test_connection_ids_are_unique_and_start_at_one(broker: rpbroker.Broker) -> None:
    forget_cached_endpoints()
    ids = []
    with trio.fail_after(20):
        for _ in range(3):
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, hello_skip=False
            ) as stream:
                ids.append(stream.connection_id)
    assert ids == [1, 2, 3]


async def test_concurrent_hellos_start_exactly_one_backend(echo_workspace: Workspace) -> None:
    forget_cached_endpoints()
    async with rpbroker.open_broker(echo_workspace.config()) as broker:
        routes: list[rpbroker.Route] = []

        async def one(i: int) -> None:
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, hello_skip=False
            ) as stream:
                assert await round_trip(stream, f"client {i}".encode()) == f"client {i}".encode()
                routes.append(stream.route)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(one, i)
        spawned = [e for e in broker.recent_events() if e.kind is EventKind.SPAWNING]
        assert len(spawned) == 1
        assert len(list(broker.backends)) == 1
        assert len(routes) == 12


async def test_distinct_versions_get_distinct_backends(broker: rpbroker.Broker) -> None:
    forget_cached_endpoints()
    with trio.fail_after(30):
        async with (
            rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as a,
            rpbroker.connect("echo", "1.2.0", broker=broker.socket_path) as b,
        ):
            assert a.endpoint != b.endpoint
    versions = sorted(h.key.service_version for h in broker.backends)
    assert versions == ["1.0.0", "1.2.0"]


async def test_backend_endpoint_answers_the_probe_and_passes_other_bytes(
    broker: rpbroker.Broker,
) -> None:
    import transports
    from rpbroker.wire.frames import decode_frame
    from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body
    from rpbroker.wire.probe import (
        PROBE_REQUEST_BODY_PREFIX,
        parse_probe_reply,
        probe_request_frame,
    )

    with trio.fail_after(20):
        async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as first:
            endpoint = first.endpoint
        backend = next(iter(broker.backends))
        nonce = bytes(range(32))
        probe = await transports.connect(endpoint)
        async with probe:
            await probe.send_all(probe_request_frame(nonce))
            body = await read_frame_body(probe, MAX_FRAME_BYTES)
            assert decode_frame(body).kind == 1  # RESPONSE
            identity = parse_probe_reply(body, nonce)
            assert identity.pid == backend.pid
            assert identity.ipc_endpoint.path == endpoint
            assert await probe.receive_some(10) == b""  # the handler saw end-of-stream
        # Application bytes that start like a probe but diverge reach the handler.
        lookalike = b"\x01\x28\x00\x00\x00" + PROBE_REQUEST_BODY_PREFIX[:2] + b"-not-a-probe"
        plain = await transports.connect(endpoint)
        async with plain:
            assert await round_trip(plain, lookalike) == lookalike
