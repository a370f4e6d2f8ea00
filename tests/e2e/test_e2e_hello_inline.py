"""A Hello answered in the accept loop's own step, and every way it goes on in a task.

When the whole Hello is in the socket by the time the broker accepts, and the
answer needs no waiting (a refusal, or ``Negotiated`` for a ready backend without
a handoff), the broker answers it without starting a connection task. Each test
controls what is in the socket at accept time: bytes written with a blocking
socket before the test's task yields are there before the broker's accept loop
runs; bytes written after ``wait_all_tasks_blocked`` arrive after it. The broker
is real (in-process), and so is its echo backend process.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.testing

import rpbroker
from rpbroker.client import hello_frame
from rpbroker.events import EventKind
from rpbroker.wire import HandoffAck, HelloReply
from rpbroker.wire.codes import FrameKind, RefusalCode
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import MAX_FRAME_BYTES, encode_framed, read_frame_body

from .support import read_exactly, round_trip

TEST_GUARD_S = 20


class ConnectionTasks(trio.abc.Instrument):
    """Counts the broker's connection tasks started while installed."""

    def __init__(self) -> None:
        self.started = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Broker._serve_connection"):
            self.started += 1


@contextmanager
def counting_connection_tasks() -> Iterator[ConnectionTasks]:
    instrument = ConnectionTasks()
    trio.lowlevel.add_instrument(instrument)
    try:
        yield instrument
    finally:
        trio.lowlevel.remove_instrument(instrument)


async def warm(broker: rpbroker.Broker) -> None:
    """Start the echo backend and let every connection of the broker end."""
    async with rpbroker.connect(
        "echo", "1.0.0", broker=broker.socket_path, handoff=False, hello_skip=False
    ) as stream:
        assert await round_trip(stream, b"warm") == b"warm"
    await broker.wait_connections_closed()


def connected_with(broker: rpbroker.Broker, data: bytes) -> trio.SocketStream:
    """Connect and write ``data`` without yielding: it is there when the broker accepts."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(broker.socket_path)
    sock.sendall(data)
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def connected_then_accepted(broker: rpbroker.Broker, data: bytes) -> trio.SocketStream:
    """Connect with ``data`` already written, and return once the broker has looked at it."""
    stream = connected_with(broker, data)
    await trio.testing.wait_all_tasks_blocked()
    return stream


async def reply_of(stream: trio.abc.Stream) -> HelloReply:
    frame = decode_frame(await read_frame_body(stream, MAX_FRAME_BYTES))
    assert int(frame.kind) == FrameKind.RESPONSE
    reply: HelloReply = decode(HelloReply, frame.payload)
    return reply


async def test_a_ready_backends_reconnect_hello_is_answered_without_a_task(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(TEST_GUARD_S):
        await warm(broker)
        [backend] = list(broker.backends)
        with counting_connection_tasks() as tasks:
            stream = await connected_then_accepted(
                broker, hello_frame("echo", "1.0.0", handoff=False)
            )
            reply = await reply_of(stream)
            assert await stream.receive_some(1) == b"", "the broker closed the connection"
            await stream.aclose()
        assert tasks.started == 0
        assert reply.WhichOneof("result") == "negotiated"
        assert reply.negotiated.backend_pipe == backend.endpoint
        assert reply.negotiated.handle_passed_token == b""


async def test_a_refusal_is_answered_without_a_task_and_recorded(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(TEST_GUARD_S), counting_connection_tasks() as tasks:
        mark = len(broker.recent_events())
        stream = await connected_then_accepted(broker, hello_frame("nope", "1.0.0", handoff=False))
        reply = await reply_of(stream)
        await stream.aclose()
    assert tasks.started == 0
    assert reply.WhichOneof("result") == "refused"
    assert RefusalCode(reply.refused.code) is RefusalCode.SERVICE_UNKNOWN
    [refused] = [e for e in broker.recent_events()[mark:] if e.kind is EventKind.HELLO_REFUSED]
    assert refused.service_name == "nope"
    assert refused.details["code"] == "SERVICE_UNKNOWN"


async def test_a_hello_that_arrives_after_the_accept_is_served_by_a_task(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(TEST_GUARD_S):
        await warm(broker)
        with counting_connection_tasks() as tasks:
            stream = await connected_then_accepted(broker, b"")
            assert tasks.started == 1, "nothing to read at accept time: a task waits for it"
            await stream.send_all(hello_frame("echo", "1.0.0", handoff=False))
            reply = await reply_of(stream)
            await stream.aclose()
        assert reply.WhichOneof("result") == "negotiated"
        await broker.wait_connections_closed()


async def test_a_hello_split_across_the_accept_goes_on_from_the_bytes_taken(
    broker: rpbroker.Broker,
) -> None:
    hello = hello_frame("echo", "1.0.0", handoff=False)
    with trio.fail_after(TEST_GUARD_S):
        await warm(broker)
        for split in (3, 5, 9, len(hello) - 1):
            with counting_connection_tasks() as tasks:
                stream = await connected_then_accepted(broker, hello[:split])
                assert tasks.started == 1
                await stream.send_all(hello[split:])
                reply = await reply_of(stream)
                await stream.aclose()
            assert reply.WhichOneof("result") == "negotiated", split
        await broker.wait_connections_closed()


async def test_a_handoff_hello_with_its_request_behind_goes_on_in_a_task(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(TEST_GUARD_S):
        await warm(broker)
        with counting_connection_tasks() as tasks:
            stream = await connected_then_accepted(
                broker, hello_frame("echo", "1.0.0", handoff=True) + b"pipelined"
            )
            reply = await reply_of(stream)
            assert reply.negotiated.handle_passed_token
            ready = decode_frame(await read_frame_body(stream, MAX_FRAME_BYTES))
            assert int(ready.kind) == FrameKind.EVENT
            assert decode(HandoffAck, ready.payload).accepted
            # The request was left in the socket for the backend, exactly once.
            assert await read_exactly(stream, len(b"pipelined")) == b"pipelined"
            assert await round_trip(stream, b"more") == b"more"
            await stream.aclose()
        assert tasks.started == 1
        await broker.wait_connections_closed()
        assert len(broker.handoff.acks) == 0


async def test_a_malformed_first_frame_is_refused_with_its_reason(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(TEST_GUARD_S):
        # Complete at accept time but not a Frame: refused, as from the task.
        stream = await connected_then_accepted(broker, encode_framed(b"\xff\xff\xff"))
        reply = await reply_of(stream)
        await stream.aclose()
    assert RefusalCode(reply.refused.code) is RefusalCode.PEER_REJECTED
    assert reply.refused.reason == "malformed broker Frame"
