"""The SDK's probe sniff on a reconnect-route connection, over in-memory streams.

The backend SDK's ``_ProbeAwareStream`` answers a probe request in any form the
reference sends and passes everything else to the handler byte for byte. These
tests drive it with ``trio.testing`` streams under ``MockClock`` so the bounded
wait for the rest of a probe-looking start costs no real time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from rpbroker import wire
from rpbroker.backend import _ProbeAwareStream
from rpbroker.wire import parse_probe_reply, probe_request_frame, probe_request_id
from rpbroker.wire.framing import read_frame_body

from ..wire.test_wire_probe import is_probe_frame

IDENTITY = wire.DaemonProcess(pid=77, exe_path="/bin/backend", exe_hash_algorithm="blake3")
NONCE = bytes(range(7, 39))
WAIT_S = _ProbeAwareStream.COMPLETION_WAIT_S


class CountingStream(trio.abc.Stream):
    """``inner`` that counts the bytes its ``receive_some`` handed out."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def exchange(chunks: Sequence[bytes]) -> tuple[bytes, bytes]:
    """Send ``chunks`` then EOF through a sniffing stream: (handler saw, client got)."""
    client, server = trio.testing.memory_stream_pair()
    sniffing = _ProbeAwareStream(server, lambda: IDENTITY)
    seen = b""

    async def handler() -> None:
        nonlocal seen
        async with sniffing:
            seen = await read_all(sniffing)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler)
        try:
            for chunk in chunks:
                await client.send_all(chunk)
                await trio.lowlevel.checkpoint()
            await client.send_eof()
        except trio.BrokenResourceError:
            # The SDK answered a probe and closed the connection before the rest.
            assert is_probe_frame(b"".join(chunks))
        got = await read_all(client)
    return seen, got


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def jumping_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_application_bytes_reach_the_handler_unchanged(data: bytes, cuts: list[int]) -> None:
    seen, got = trio.run(exchange, split(data, cuts), clock=jumping_clock())
    if is_probe_frame(data):
        assert seen == b""
        assert got.startswith(b"\x01")
    else:
        assert (seen, got) == (data, b"")


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 50),
    st.binary(min_size=1, max_size=40),
    st.lists(st.integers(0, 100), max_size=4),
)
def test_probe_prefixes_followed_by_other_bytes_reach_the_handler(
    nonce: bytes, keep: int, tail: bytes, cuts: list[int]
) -> None:
    data = probe_request_frame(nonce)[:keep] + tail
    seen, _got = trio.run(exchange, split(data, cuts), clock=jumping_clock())
    if not is_probe_frame(data):
        assert seen == data


@pytest.mark.parametrize(
    "request_frame",
    [
        probe_request_frame(NONCE),  # the reference's form
        probe_request_frame(NONCE, request_id=0),
        probe_request_frame(b"\xff" * 32),  # the longest request_id varint
        wire.framed(
            wire.request(0xB232, NONCE, request_id=12, traceparent="00-tp", tracestate="k=v")
        ),
    ],
    ids=["reference", "zero-id", "max-id", "traced"],
)
async def test_every_probe_form_is_answered_with_its_request_metadata(
    request_frame: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    request = wire.decode_frame(request_frame[5:])
    for chunks in ([request_frame], [request_frame[:3], request_frame[3:20], request_frame[20:]]):
        client, server = trio.testing.memory_stream_pair()
        sniffing = _ProbeAwareStream(server, lambda: IDENTITY)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, sniffing)
            for chunk in chunks:
                await client.send_all(chunk)
                await trio.lowlevel.checkpoint()
            body = await read_frame_body(client)
            assert await client.receive_some() == b""  # the SDK closed the connection
        reply = wire.decode_frame(body)
        assert reply.request_id == request.request_id
        assert (reply.traceparent, reply.tracestate) == (request.traceparent, request.tracestate)
        nonce = bytes(request.payload)
        assert parse_probe_reply(body, nonce, request_id=request.request_id) == IDENTITY


async def test_a_client_that_sends_three_probe_like_bytes_and_waits_is_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    sniffing = _ProbeAwareStream(server, lambda: IDENTITY)

    async def echo() -> None:
        while data := await sniffing.receive_some():
            await sniffing.send_all(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            started = trio.current_time()
            await client.send_all(b"\x01\x28\x00")  # a strict prefix of a probe header
            assert await client.receive_some() == b"\x01\x28\x00"
            # Served once the bounded wait for the rest of a probe ran out, not later.
            assert trio.current_time() - started == pytest.approx(WAIT_S, abs=1e-6)
            await client.send_all(b"more")
            assert await client.receive_some() == b"more"
            await client.send_eof()


async def test_a_probe_split_wider_than_the_wait_goes_to_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    framed = probe_request_frame(NONCE)
    client, server = trio.testing.memory_stream_pair()
    sniffing = _ProbeAwareStream(server, lambda: IDENTITY)
    async with trio.open_nursery() as nursery:
        seen: list[bytes] = []

        async def handler() -> None:
            async with sniffing:
                seen.append(await read_all(sniffing))

        nursery.start_soon(handler)
        await client.send_all(framed[:10])
        await trio.sleep(2 * WAIT_S)
        await client.send_all(framed[10:])
        await client.send_eof()
    assert seen == [framed]


async def test_the_sniff_never_reads_past_the_probe_frame() -> None:
    framed = probe_request_frame(NONCE)
    client, server = trio.testing.memory_stream_pair()
    counting = CountingStream(server)
    sniffing = _ProbeAwareStream(counting, lambda: IDENTITY)
    await client.send_all(framed + b"application bytes that follow")
    assert await sniffing.receive_some() == b""
    assert counting.received == len(framed)


async def test_a_cancelled_receive_during_the_sniff_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    sniffing = _ProbeAwareStream(server, lambda: IDENTITY)
    await client.send_all(b"\x01\x2a\x00\x00")
    with trio.move_on_after(WAIT_S / 4) as scope:
        await sniffing.receive_some()
    assert scope.cancelled_caught
    await client.send_all(b"\x00rest")
    assert await sniffing.receive_some() == b"\x01\x2a\x00\x00\x00rest"


async def test_after_a_probe_the_handler_sees_a_closed_peer() -> None:
    client, server = trio.testing.memory_stream_pair()
    sniffing = _ProbeAwareStream(server, lambda: IDENTITY)
    await client.send_all(probe_request_frame(NONCE))
    assert await sniffing.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await sniffing.send_all(b"late")
    body = await read_frame_body(client)
    assert parse_probe_reply(body, NONCE, request_id=probe_request_id(NONCE)) == IDENTITY
