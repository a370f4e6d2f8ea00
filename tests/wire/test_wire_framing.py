"""Outer framing: header layout, caps, typed errors, the incremental decoder, and
reading exactly one frame from a trio stream without touching the bytes behind it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from rpbroker.wire import framing
from rpbroker.wire.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_HELLO_BYTES,
    BadFramingByte,
    FrameDecoder,
    FrameStage,
    FrameTooLarge,
    FramingError,
    TruncatedFrame,
    encode_framed,
    parse_header,
    read_exactly,
    read_frame_body,
    write_frame_body,
)

H = bytes.fromhex


def header(length: int, byte: int = 1) -> bytes:
    return bytes([byte]) + length.to_bytes(4, "little")


def stream_with(data: bytes) -> trio.testing.MemoryReceiveStream:
    """A receive stream holding ``data``; not closed, so reading past it would block."""
    receive = trio.testing.MemoryReceiveStream()
    receive.put_data(data)
    return receive


def closed_stream_with(data: bytes) -> trio.testing.MemoryReceiveStream:
    receive = stream_with(data)
    receive.put_eof()
    return receive


class RecordingReceiveStream(trio.abc.ReceiveStream):
    """Hands out at most ``chunk`` bytes per call and records every ``max_bytes`` asked for."""

    def __init__(self, data: bytes, chunk: int = 1) -> None:
        self.data = bytearray(data)
        self.chunk = chunk
        self.requests: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.requests.append(max_bytes)
        limit = self.chunk if max_bytes is None else min(self.chunk, max_bytes)
        out = bytes(self.data[:limit])
        del self.data[:limit]
        return out

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class RecordingSendStream(trio.abc.SendStream):
    def __init__(self) -> None:
        self.sends: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sends.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


# --- constants and layout -----------------------------------------------------------


def test_size_cap_constants_are_frozen() -> None:
    assert FRAME_HEADER_BYTES == 5
    assert MAX_FRAME_BYTES == 16_777_216
    assert MAX_HELLO_BYTES == 65_536


def test_layout_is_framing_byte_then_le_length_then_body() -> None:
    body = bytes(range(256)) + b"tail" * 11  # 300 bytes
    out = encode_framed(body)
    assert out[0] == 1
    assert out[1:5] == H("2c010000")  # 300 little-endian
    assert out[5:] == body


def test_header_for_a_100_byte_body() -> None:
    assert encode_framed(bytes(100))[:5] == H("0164000000")


def test_empty_body_round_trip() -> None:
    assert encode_framed(b"") == H("0100000000")
    decoder = FrameDecoder()
    decoder.feed(H("0100000000"))
    assert list(decoder) == [b""]


def test_encode_framed_rejects_oversize_and_accepts_the_cap() -> None:
    with pytest.raises(FrameTooLarge) as caught:
        encode_framed(bytes(MAX_FRAME_BYTES + 1))
    assert caught.value.length == MAX_FRAME_BYTES + 1
    assert caught.value.cap == MAX_FRAME_BYTES
    assert len(encode_framed(bytes(MAX_FRAME_BYTES))) == MAX_FRAME_BYTES + 5


# --- parse_header -------------------------------------------------------------------


def test_parse_header_returns_length() -> None:
    assert parse_header(header(300), MAX_FRAME_BYTES) == 300
    assert parse_header(header(MAX_HELLO_BYTES), MAX_HELLO_BYTES) == MAX_HELLO_BYTES


def test_parse_header_bad_byte_is_checked_before_length() -> None:
    # Bad byte AND oversize length: the byte is reported.
    with pytest.raises(BadFramingByte) as caught:
        parse_header(header(MAX_FRAME_BYTES + 1, byte=2), MAX_FRAME_BYTES, offset=40)
    assert caught.value.got == 2
    assert caught.value.offset == 40
    assert caught.value.stage is FrameStage.HEADER_BYTE
    assert "offset 40" in str(caught.value)
    assert "0x02" in str(caught.value)


def test_parse_header_oversize() -> None:
    with pytest.raises(FrameTooLarge) as caught:
        parse_header(header(MAX_HELLO_BYTES + 1), MAX_HELLO_BYTES, offset=7)
    assert (caught.value.length, caught.value.cap, caught.value.offset) == (
        MAX_HELLO_BYTES + 1,
        MAX_HELLO_BYTES,
        7,
    )
    assert "65537" in str(caught.value)
    assert "65536" in str(caught.value)


def test_parse_header_short_input() -> None:
    with pytest.raises(TruncatedFrame) as empty:
        parse_header(b"", MAX_FRAME_BYTES)
    assert empty.value.stage is FrameStage.HEADER_BYTE
    with pytest.raises(TruncatedFrame) as short:
        parse_header(H("0101"), MAX_FRAME_BYTES, offset=3)
    assert (short.value.stage, short.value.received, short.value.expected) == (
        FrameStage.LENGTH,
        1,
        4,
    )
    assert short.value.offset == 4
    with pytest.raises(ValueError, match="5 bytes"):
        parse_header(H("010000000000"), MAX_FRAME_BYTES)


def test_all_errors_are_framing_errors() -> None:
    for cls in (BadFramingByte, FrameTooLarge, TruncatedFrame):
        assert issubclass(cls, FramingError)


# --- FrameDecoder -------------------------------------------------------------------


def test_decoder_back_to_back_frames_in_one_chunk() -> None:
    bodies = [b"one", b"", b"three" * 50]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_framed(b) for b in bodies))
    assert list(decoder) == bodies
    assert decoder.pending_bytes == 0
    assert decoder.next_body() is None
    decoder.finish()


def test_decoder_byte_by_byte() -> None:
    data = encode_framed(b"abc") + encode_framed(b"de")
    decoder = FrameDecoder()
    seen: list[bytes] = []
    for index in range(len(data)):
        decoder.feed(data[index : index + 1])
        seen.extend(decoder)
    assert seen == [b"abc", b"de"]
    assert decoder.offset == len(data)


def test_decoder_pending_bytes_counts_the_partial_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_framed(b"done") + header(10) + b"abc")
    assert decoder.pending_bytes == 8
    assert decoder.next_body() == b"done"
    assert decoder.next_body() is None


def test_decoder_rejects_bad_byte_at_once_with_stream_offset() -> None:
    first = encode_framed(b"ok")
    decoder = FrameDecoder()
    with pytest.raises(BadFramingByte) as caught:
        decoder.feed(first + b"\x02")  # only the bad byte of the second frame
    assert caught.value.got == 2
    assert caught.value.offset == len(first)
    # Poisoned: the same error again on feed, after the good body is handed out.
    with pytest.raises(BadFramingByte) as again:
        decoder.feed(encode_framed(b"more"))
    assert again.value is caught.value
    assert decoder.error is caught.value
    assert decoder.next_body() == b"ok"
    with pytest.raises(BadFramingByte):
        decoder.next_body()


def test_decoder_rejects_oversize_length_before_any_body() -> None:
    decoder = FrameDecoder(cap=16)
    decoder.feed(header(17)[:4])  # length not complete yet: nothing to say
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(header(17)[4:])
    assert (caught.value.length, caught.value.cap, caught.value.offset) == (17, 16, 0)
    assert decoder.pending_bytes == 0
    with pytest.raises(FrameTooLarge):
        decoder.finish()


def test_decoder_accepts_a_body_of_exactly_cap() -> None:
    decoder = FrameDecoder(cap=16)
    decoder.feed(encode_framed(bytes(16)))
    assert decoder.next_body() == bytes(16)


def test_decoder_finish_reports_the_truncated_stage() -> None:
    partial_length = FrameDecoder()
    partial_length.feed(encode_framed(b"x") + H("0105"))
    with pytest.raises(TruncatedFrame) as length:
        partial_length.finish()
    assert (length.value.stage, length.value.received, length.value.expected) == (
        FrameStage.LENGTH,
        1,
        4,
    )
    assert length.value.offset == 6 + 1
    assert partial_length.next_body() == b"x"  # complete bodies survive

    partial_body = FrameDecoder()
    partial_body.feed(header(10) + b"abcd")
    with pytest.raises(TruncatedFrame) as body:
        partial_body.finish()
    assert (body.value.stage, body.value.received, body.value.expected) == (
        FrameStage.BODY,
        4,
        10,
    )
    assert body.value.offset == 5
    assert "frame body" in str(body.value)
    with pytest.raises(TruncatedFrame):
        partial_body.feed(b"ef")  # poisoned by the truncation


def test_decoder_rejects_negative_cap() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(cap=-1)


# --- reading from a trio stream -----------------------------------------------------


async def test_read_frame_body_happy_path() -> None:
    stream = closed_stream_with(encode_framed(b"hello"))
    assert await read_frame_body(stream) == b"hello"


async def test_read_frame_body_back_to_back() -> None:
    stream = closed_stream_with(encode_framed(b"a") + encode_framed(b"") + encode_framed(b"bc"))
    assert [await read_frame_body(stream) for _ in range(3)] == [b"a", b"", b"bc"]
    assert await stream.receive_some() == b""


async def test_read_frame_body_leaves_following_bytes_in_the_stream() -> None:
    rest = encode_framed(b"second") + b"extra bytes for the next owner"
    stream = stream_with(encode_framed(b"first") + rest)
    assert await read_frame_body(stream) == b"first"
    stream.put_eof()
    leftover = b""
    while chunk := await stream.receive_some():
        leftover += chunk
    assert leftover == rest


async def test_read_frame_body_never_asks_for_more_than_it_needs() -> None:
    data = encode_framed(b"xyz") + b"NEXT"
    stream = RecordingReceiveStream(data, chunk=64)
    assert await read_frame_body(stream) == b"xyz"
    # The whole header in one request (never past it), then exactly the body.
    assert stream.requests == [5, 3]
    assert bytes(stream.data) == b"NEXT"


async def test_read_frame_body_assembles_a_trickle() -> None:
    stream = RecordingReceiveStream(encode_framed(b"trickled body"), chunk=1)
    assert await read_frame_body(stream) == b"trickled body"
    assert all(request is not None and request >= 1 for request in stream.requests)


async def test_read_frame_body_bad_byte_consumes_at_most_the_header() -> None:
    # The header is asked for in one receive: a bad framing byte is reported at
    # once, having consumed at most the rest of the 5-byte header, never more.
    stream = stream_with(H("02") + H("05000000") + b"after")
    with pytest.raises(BadFramingByte) as caught:
        await read_frame_body(stream, offset=12)
    assert caught.value.got == 2
    assert caught.value.offset == 12
    stream.put_eof()
    assert await stream.receive_some() == b"after"


async def test_read_frame_body_bad_byte_is_reported_before_the_length_arrives() -> None:
    stream = stream_with(H("02"))  # the peer sends one wrong byte and waits
    with trio.fail_after(1), pytest.raises(BadFramingByte):
        await read_frame_body(stream)


@pytest.mark.parametrize("cap", [MAX_HELLO_BYTES, MAX_FRAME_BYTES])
async def test_read_frame_body_oversize_fails_before_the_body_is_read(cap: int) -> None:
    body_start = b"BODY BYTES THAT MUST STAY"
    stream = stream_with(header(cap + 1) + body_start)
    with pytest.raises(FrameTooLarge) as caught:
        await read_frame_body(stream, cap)
    assert (caught.value.length, caught.value.cap) == (cap + 1, cap)
    assert await stream.receive_some() == body_start


async def test_hello_cap_is_separate_from_the_frame_cap() -> None:
    big = bytes(MAX_HELLO_BYTES + 1)
    assert await read_frame_body(closed_stream_with(encode_framed(big))) == big
    with pytest.raises(FrameTooLarge):
        await read_frame_body(closed_stream_with(encode_framed(big)), MAX_HELLO_BYTES)
    exact = bytes(MAX_HELLO_BYTES)
    assert await read_frame_body(closed_stream_with(encode_framed(exact)), MAX_HELLO_BYTES) == exact


@pytest.mark.parametrize(
    "data,stage,received,expected,offset,words",
    [
        (b"", FrameStage.HEADER_BYTE, 0, 1, 0, "framing"),
        (H("010a"), FrameStage.LENGTH, 1, 4, 1, "length"),
        (header(10) + b"abcd", FrameStage.BODY, 4, 10, 5, "body"),
    ],
    ids=["header-byte", "length", "body"],
)
async def test_read_frame_body_truncation_names_the_stage(
    data: bytes, stage: FrameStage, received: int, expected: int, offset: int, words: str
) -> None:
    with pytest.raises(TruncatedFrame) as caught:
        await read_frame_body(closed_stream_with(data))
    error = caught.value
    assert (error.stage, error.received, error.expected, error.offset) == (
        stage,
        received,
        expected,
        offset,
    )
    assert words in str(error)


async def test_read_exactly_zero_does_not_touch_the_stream() -> None:
    stream = RecordingReceiveStream(b"abc")
    assert await read_exactly(stream, 0, FrameStage.BODY) == b""
    assert stream.requests == []


async def test_read_exactly_rejects_a_stream_that_overdelivers() -> None:
    class Greedy(RecordingReceiveStream):
        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await trio.lowlevel.checkpoint()
            return b"too many bytes"

    with pytest.raises(RuntimeError, match="returned 14 bytes"):
        await read_exactly(Greedy(b""), 2, FrameStage.BODY)


async def test_cancelled_read_may_leave_the_stream_mid_frame() -> None:
    """Documented semantics: cancellation loses what was consumed; the stream is unusable."""
    stream = stream_with(header(10) + b"abcd")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_once_blocked() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            nursery.start_soon(cancel_once_blocked)
            await read_frame_body(stream)
    assert scope.cancelled_caught
    stream.put_data(b"efghij")
    stream.put_eof()
    # The header and "abcd" are gone; what remains no longer starts a frame.
    with pytest.raises(BadFramingByte):
        await read_frame_body(stream)


# --- writing ------------------------------------------------------------------------


async def test_write_frame_body_is_one_send_all() -> None:
    stream = RecordingSendStream()
    await write_frame_body(stream, b"payload")
    assert stream.sends == [H("0107000000") + b"payload"]


async def test_write_then_read_over_a_memory_pair() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await write_frame_body(send, b"over the pair")
    await write_frame_body(send, b"")
    assert await read_frame_body(receive) == b"over the pair"
    assert await read_frame_body(receive) == b""


async def test_write_frame_body_rejects_oversize_and_writes_nothing() -> None:
    stream = RecordingSendStream()
    with pytest.raises(FrameTooLarge):
        await write_frame_body(stream, bytes(MAX_FRAME_BYTES + 1))
    assert stream.sends == []


def test_module_docstring_states_its_scope() -> None:
    source = framing.__doc__ or ""
    assert "What it does not do" in source
