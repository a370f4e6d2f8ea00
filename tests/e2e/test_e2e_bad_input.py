"""Every bad input of SPEC §9 at the wire level, from a raw-socket client."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
import trio

import rpbroker
import transports
from rpbroker.client import hello_frame
from rpbroker.events import EventKind
from rpbroker.wire import Frame, Hello, HelloReply, Refused
from rpbroker.wire.codes import FrameKind, RefusalCode
from rpbroker.wire.frames import decode, decode_frame, encode, framed, request
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body
from rpbroker.wire.protocols import PayloadProtocol

from .support import Workspace, round_trip


async def exchange(socket: str, data: bytes) -> tuple[Frame, Refused]:
    """Send raw bytes, read one reply frame, return it with its Refused payload."""
    stream = await transports.connect(socket)
    async with stream:
        await stream.send_all(data)
        body = await read_frame_body(stream, MAX_FRAME_BYTES)
        frame = decode_frame(body)
        reply = decode(HelloReply, frame.payload)
        assert reply.WhichOneof("result") == "refused", reply
        # The broker closes the connection after a refusal (a reset when it left
        # unread bytes behind, as for oversize frames whose body is not drained).
        with contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some(1) == b""
        return frame, reply.refused


def hello(**fields: object) -> Hello:
    values: dict[str, object] = {
        "client_min_protocol": 1,
        "client_max_protocol": 1,
        "service_name": "echo",
        "wanted_version": "1.0.0",
        "peer_pid": os.getpid(),
    }
    values.update(fields)
    return Hello(**values)  # type: ignore[arg-type]


def hello_bytes(msg: Hello, *, request_id: int = 7) -> bytes:
    return framed(request(PayloadProtocol.CONTROL, encode(msg), request_id=request_id))


async def assert_still_serving(broker: rpbroker.Broker) -> None:
    async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path, hello_skip=False) as s:
        assert await round_trip(s, b"alive") == b"alive"


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (b"\xff\xff\xff", RefusalCode.VERSION_UNSUPPORTED, "unsupported framing version"),
        (b"\x02\x00\x00\x00\x00", RefusalCode.VERSION_UNSUPPORTED, "unsupported framing version"),
        (
            b"\x01" + struct.pack("<I", 64 * 1024 + 1),
            RefusalCode.PEER_REJECTED,
            "initial Hello frame exceeds 64 KiB",
        ),
        (
            b"\x01" + struct.pack("<I", 0xFFFFFFFF),
            RefusalCode.PEER_REJECTED,
            "initial Hello frame exceeds 64 KiB",
        ),
        (b"\x01\x03\x00\x00\x00\xff\xff\xff", RefusalCode.PEER_REJECTED, "malformed broker Frame"),
    ],
)
async def test_framing_garbage_is_refused_and_broker_survives(
    broker: rpbroker.Broker, data: bytes, code: RefusalCode, reason: str
) -> None:
    with trio.fail_after(20):
        frame, refused = await exchange(broker.socket_path, data)
        assert RefusalCode(refused.code) == code
        assert refused.reason == reason
        assert frame.request_id == 0
        assert FrameKind(frame.kind) is FrameKind.RESPONSE
        assert (refused.daemon_min_protocol, refused.daemon_max_protocol) == (1, 1)
        await assert_still_serving(broker)


async def test_truncated_frame_is_refused_as_incomplete(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        stream = await transports.connect(broker.socket_path)
        async with stream:
            await stream.send_all(b"\x01\x10\x00\x00\x00abcd")
            assert isinstance(stream, trio.SocketStream)
            await stream.send_eof()
            frame = decode_frame(await read_frame_body(stream, MAX_FRAME_BYTES))
            refused = decode(HelloReply, frame.payload).refused
            assert RefusalCode(refused.code) == RefusalCode.PEER_REJECTED
            assert refused.reason == "incomplete Hello frame"


async def test_valid_frame_with_garbage_payload_echoes_request_id(broker: rpbroker.Broker) -> None:
    data = framed(
        request(
            PayloadProtocol.CONTROL,
            b"\xff\xff\xff",
            request_id=41,
            traceparent="00-abc",
            tracestate="k=v",
        )
    )
    with trio.fail_after(20):
        frame, refused = await exchange(broker.socket_path, data)
    assert RefusalCode(refused.code) == RefusalCode.PEER_REJECTED
    assert refused.reason == "malformed Hello payload"
    assert (frame.request_id, frame.traceparent, frame.tracestate) == (41, "00-abc", "k=v")


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        (
            {"client_min_protocol": 99, "client_max_protocol": 99},
            RefusalCode.VERSION_UNSUPPORTED,
            "client protocol range does not include v1",
        ),
        ({"service_name": "../echo"}, RefusalCode.PEER_REJECTED, "invalid service_name"),
        ({"service_name": "Echo"}, RefusalCode.PEER_REJECTED, "invalid service_name"),
        ({"service_name": "echo; rm -rf /"}, RefusalCode.PEER_REJECTED, "invalid service_name"),
        ({"service_name": "a" * 65}, RefusalCode.PEER_REJECTED, "invalid service_name"),
        (
            {"wanted_version": "1.0.0; rm -rf /"},
            RefusalCode.PEER_REJECTED,
            "invalid wanted_version",
        ),
        ({"wanted_version": "$(reboot)"}, RefusalCode.PEER_REJECTED, "invalid wanted_version"),
        (
            {"wanted_version": "1.0.0-../../evil"},
            RefusalCode.PEER_REJECTED,
            "invalid wanted_version",
        ),
        (
            {"client_version": "x" * 129},
            RefusalCode.PEER_REJECTED,
            "client_version exceeds 128 bytes",
        ),
        (
            {"client_lib_name": "x" * 65},
            RefusalCode.PEER_REJECTED,
            "client_lib fields exceed 64 bytes",
        ),
        ({"peer_pid": 1}, RefusalCode.PEER_REJECTED, "peer_pid does not match verified peer"),
        (
            {"service_name": "nosuch"},
            RefusalCode.SERVICE_UNKNOWN,
            "service definition was not found",
        ),
        (
            {"wanted_version": "0.9.0"},
            RefusalCode.VERSION_BLOCKED,
            "wanted_version is below min_version",
        ),
    ],
)
async def test_hostile_hello_fields_are_refused_and_nothing_spawns(
    broker: rpbroker.Broker, fields: dict[str, object], code: RefusalCode, reason: str
) -> None:
    with trio.fail_after(20):
        frame, refused = await exchange(broker.socket_path, hello_bytes(hello(**fields)))
    assert RefusalCode(refused.code) == code
    assert refused.reason == reason
    assert frame.request_id == 7
    assert list(broker.backends) == []
    assert not [e for e in broker.recent_events() if e.kind is EventKind.SPAWNING]
    if code is RefusalCode.VERSION_BLOCKED:
        assert refused.retry_after_ms == 30000


@pytest.mark.parametrize(
    ("kind", "protocol", "encoding", "code", "reason"),
    [
        (
            FrameKind.EVENT,
            PayloadProtocol.CONTROL,
            0,
            RefusalCode.PEER_REJECTED,
            "Hello frame kind must be REQUEST",
        ),
        (
            FrameKind.REQUEST,
            PayloadProtocol.HANDOFF,
            0,
            RefusalCode.PEER_REJECTED,
            "Hello frame payload_protocol must be control-plane",
        ),
        (
            FrameKind.REQUEST,
            PayloadProtocol.CONTROL,
            1,
            RefusalCode.PEER_REJECTED,
            "Hello payload must not be compressed",
        ),
    ],
)
async def test_bad_envelopes_are_refused_in_order(
    broker: rpbroker.Broker,
    kind: FrameKind,
    protocol: int,
    encoding: int,
    code: RefusalCode,
    reason: str,
) -> None:
    frame = request(protocol, encode(hello()), request_id=3)
    frame.kind = kind  # type: ignore[assignment]
    frame.payload_encoding = encoding  # type: ignore[assignment]
    with trio.fail_after(20):
        _, refused = await exchange(broker.socket_path, framed(frame))
    assert (RefusalCode(refused.code), refused.reason) == (code, reason)


async def test_wrong_envelope_version_is_version_unsupported(broker: rpbroker.Broker) -> None:
    frame = request(PayloadProtocol.CONTROL, encode(hello()), request_id=3)
    frame.envelope_version = 2
    with trio.fail_after(20):
        _, refused = await exchange(broker.socket_path, framed(frame))
    assert (RefusalCode(refused.code), refused.reason) == (
        RefusalCode.VERSION_UNSUPPORTED,
        "frame envelope_version is not v1",
    )


async def test_version_outside_allow_list_is_blocked(workspace: Workspace) -> None:
    workspace.add_service("pinned", allow_list=("2.0.0",))
    async with rpbroker.open_broker(workspace.config()) as broker:
        with trio.fail_after(20):
            _, refused = await exchange(
                broker.socket_path,
                hello_bytes(hello(service_name="pinned", wanted_version="2.0.1")),
            )
    assert RefusalCode(refused.code) == RefusalCode.VERSION_BLOCKED
    assert refused.reason == "wanted_version is not in version_allow_list"


async def test_service_definition_is_reread_on_every_hello(echo_workspace: Workspace) -> None:
    async with rpbroker.open_broker(echo_workspace.config()) as broker:
        with trio.fail_after(20):
            async with rpbroker.connect("echo", "1.5.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"x") == b"x"
            echo_workspace.add_service("echo", min_version="2.0.0")
            with pytest.raises(rpbroker.RefusedError) as info:
                await rpbroker.open_connection(
                    "echo", "1.5.0", broker=broker.socket_path, hello_skip=False
                )
    assert info.value.code is RefusalCode.VERSION_BLOCKED
    assert info.value.retry_after_ms == 30000


async def test_silent_peer_is_cut_off_at_the_deadline_without_a_reply(
    echo_workspace: Workspace,
) -> None:
    async with rpbroker.open_broker(echo_workspace.config(hello_timeout_s=0.3)) as broker:
        with trio.fail_after(20):
            stream = await transports.connect(broker.socket_path)
            async with stream:
                assert await stream.receive_some(100) == b""
            await assert_still_serving(broker)
        assert any(e.kind is EventKind.PEER_DROPPED for e in broker.recent_events())


async def test_trickling_peer_does_not_extend_the_deadline(echo_workspace: Workspace) -> None:
    async with rpbroker.open_broker(echo_workspace.config(hello_timeout_s=0.5)) as broker:
        data = hello_frame("echo", "1.0.0", handoff=False)
        with trio.fail_after(20):
            stream = await transports.connect(broker.socket_path)
            async with stream:
                closed = trio.Event()

                async def trickle() -> None:
                    # One byte at a time, each well inside the deadline; the
                    # whole frame would take far longer than the deadline.
                    for byte in data:
                        if closed.is_set():
                            return
                        try:
                            await stream.send_all(bytes([byte]))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return
                        await trio.sleep(0.1)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    assert await stream.receive_some(100) == b""
                    closed.set()
                    nursery.cancel_scope.cancel()
            await assert_still_serving(broker)


async def test_rate_limit_refuses_with_retry_after(echo_workspace: Workspace) -> None:
    async with rpbroker.open_broker(
        echo_workspace.config(hello_rate_limit=3, hello_rate_window_s=60)
    ) as broker:
        with trio.fail_after(20):
            for _ in range(3):
                async with rpbroker.connect(
                    "echo", "1.0.0", broker=broker.socket_path, hello_skip=False
                ):
                    pass
            with pytest.raises(rpbroker.RefusedError) as info:
                await rpbroker.open_connection(
                    "echo", "1.0.0", broker=broker.socket_path, hello_skip=False
                )
    assert info.value.code is RefusalCode.RATE_LIMITED
    assert info.value.retry_after_ms is not None and info.value.retry_after_ms > 0


async def test_malformed_flood_does_not_stop_the_accept_loop(broker: rpbroker.Broker) -> None:
    async def bad(i: int) -> None:
        data = b"\x01\x03\x00\x00\x00\xff\xff\xff" if i % 2 else framed(request(0, b"\xff\xff\xff"))
        _, refused = await exchange(broker.socket_path, data)
        assert RefusalCode(refused.code) == RefusalCode.PEER_REJECTED

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(bad, i)
        await assert_still_serving(broker)
