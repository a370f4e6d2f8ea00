"""Hypothesis properties, the Python counterpart of the v1 fuzz targets (facts §12).

- the incremental decoder never yields a body over its cap, never buffers more than
  header + cap of a partial frame, and raises nothing but FramingError subclasses;
- any chunking of several valid frames yields the same bodies as one piece;
- ``read_frame_body`` on arbitrary bytes obeys the same rules;
- decoding arbitrary bytes as any message type raises only MalformedMessage;
- Frames round-trip through encode / framing / decode.
"""

from __future__ import annotations

import itertools

import trio
import trio.testing
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpbroker import wire
from rpbroker.wire import (
    FRAME_HEADER_BYTES,
    MAX_HELLO_BYTES,
    FrameDecoder,
    FramingError,
    MalformedMessage,
    encode_framed,
    read_frame_body,
)

# No timing in tests: switch off Hypothesis' per-example deadline.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Small caps make the "over the cap" paths reachable with small inputs.
caps = st.integers(min_value=0, max_value=64)


def _frame_like_bytes() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, biased to start with plausible headers so deep paths are reached."""
    plausible = st.builds(
        lambda length, rest: b"\x01" + length.to_bytes(4, "little") + rest,
        st.integers(min_value=0, max_value=80),
        st.binary(max_size=120),
    )
    return st.one_of(st.binary(max_size=200), plausible, st.lists(plausible).map(b"".join))


@PROPERTY
@given(data=_frame_like_bytes(), cap=caps, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_decoder_on_arbitrary_bytes(data: bytes, cap: int, cuts: list[int]) -> None:
    decoder = FrameDecoder(cap=cap)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    try:
        for start, end in itertools.pairwise(points):
            decoder.feed(data[start:end])
            assert decoder.pending_bytes <= FRAME_HEADER_BYTES + cap
            for body in decoder:
                assert len(body) <= cap
        decoder.finish()
    except FramingError:
        pass


@PROPERTY
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_chunking_yields_the_same_bodies(bodies: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_framed(body) for body in bodies)
    whole = FrameDecoder()
    whole.feed(data)
    expected = list(whole)
    assert expected == bodies

    chunked = FrameDecoder()
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    got: list[bytes] = []
    for start, end in itertools.pairwise(points):
        chunked.feed(data[start:end])
        got.extend(chunked)
    chunked.finish()
    assert got == expected
    assert chunked.offset == len(data)


@PROPERTY
@given(data=_frame_like_bytes(), cap=caps)
def test_read_frame_body_on_arbitrary_bytes(data: bytes, cap: int) -> None:
    async def main() -> None:
        stream = trio.testing.MemoryReceiveStream()
        stream.put_data(data)
        stream.put_eof()
        consumed = 0
        while True:
            try:
                body = await read_frame_body(stream, cap, offset=consumed)
            except FramingError:
                return
            assert len(body) <= cap
            consumed += FRAME_HEADER_BYTES + len(body)
            assert data[consumed - len(body) : consumed] == body

    trio.run(main)


MESSAGE_TYPES: list[type[Message]] = [
    getattr(wire, name)
    for name in wire.__all__
    if isinstance(getattr(wire, name), type) and issubclass(getattr(wire, name), Message)
]


@PROPERTY
@given(cls=st.sampled_from(MESSAGE_TYPES), data=st.binary(max_size=300))
def test_decoding_arbitrary_bytes_raises_only_malformed_message(
    cls: type[Message], data: bytes
) -> None:
    try:
        message = wire.decode(cls, data)
    except MalformedMessage as exc:
        assert exc.message_name == cls.DESCRIPTOR.name
        return
    # Whatever decoded re-encodes and decodes to the same message.
    assert wire.decode(cls, wire.encode(message)) == message


uint32 = st.integers(min_value=0, max_value=2**32 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
frames = st.builds(
    wire.Frame,
    envelope_version=uint32,
    kind=st.integers(min_value=0, max_value=3),
    payload_protocol=st.integers(min_value=0, max_value=0xFFFF),
    payload=st.binary(max_size=200),
    request_id=uint64,
    payload_encoding=st.integers(min_value=0, max_value=3),
    deadline_unix_ms=uint64,
    traceparent=st.text(max_size=40),
    tracestate=st.text(max_size=40),
)


@PROPERTY
@given(frame=frames)
def test_frames_round_trip_through_framing(frame: wire.Frame) -> None:
    decoder = FrameDecoder(cap=MAX_HELLO_BYTES)
    decoder.feed(wire.framed(frame))
    body = decoder.next_body()
    assert body is not None
    assert wire.decode_frame(body) == frame
    assert wire.encode(wire.decode_frame(body)) == body  # canonical is stable


@PROPERTY
@given(value=uint64.filter(lambda v: v != 0), token=st.binary(max_size=16))
def test_explicit_handle_matches_canonical_when_non_zero(value: int, token: bytes) -> None:
    offer = wire.HandoffOffer(handle_value=value, token=token)
    assert wire.encode_handoff_offer_with_attachment(offer) == wire.encode(offer)
    assert wire.encode(offer)[:1] == b"\x08"
    assert wire.encode(offer)[1 : 1 + len(wire.encode_varint(value))] == wire.encode_varint(value)
