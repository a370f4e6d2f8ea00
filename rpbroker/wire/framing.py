"""Outer framing of the broker v1 stream: ``0x01``, u32 LE body length, body.

What this module does: turns a body into a framed byte string, parses and checks a
5-byte header (framing byte first, then the length against a cap, before any body
byte is read or allocated), decodes frames incrementally from arbitrary chunks
(``FrameDecoder``), and reads / writes exactly one frame on a trio stream. Every
failure is a typed ``FramingError`` that says at which stage and at which byte
offset (counted from the start of the stream or buffer) it happened.

What it does not do: decode the protobuf body (see ``rpbroker.wire.frames``),
impose deadlines (callers wrap reads in ``trio.move_on_after`` / ``fail_at``), or
decide how a framing failure is answered (the Hello path maps it to a refusal).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterator
from typing import Final

import trio

from rpbroker.wire.codes import FRAMING_VERSION

#: Bytes before every body: 1 framing byte + 4-byte little-endian u32 length.
FRAME_HEADER_BYTES: Final = 5
#: Largest body (bytes) any v1 frame may carry: 16 MiB, frozen by the v1 protocol.
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
#: Largest body (bytes) of the first frame on a broker connection (the Hello):
#: 64 KiB, frozen by v1 so an unauthenticated peer cannot make the broker buffer more.
MAX_HELLO_BYTES: Final = 64 * 1024

#: Bytes of the length field that follows the framing byte (u32 little-endian).
_LENGTH_BYTES: Final = FRAME_HEADER_BYTES - 1
_HEADER: Final = struct.Struct("<BI")
_LENGTH: Final = struct.Struct("<I")


class FrameStage(enum.Enum):
    """The part of a frame being read when something went wrong."""

    HEADER_BYTE = "framing byte"
    LENGTH = "body length header"
    BODY = "frame body"


class FramingError(Exception):
    """Base of every framing failure. ``stage`` and ``offset`` locate it."""

    stage: FrameStage
    offset: int


class BadFramingByte(FramingError):
    """The first byte of a frame is not ``FRAMING_VERSION`` (1)."""

    def __init__(self, got: int, offset: int) -> None:
        self.got = got
        self.expected = FRAMING_VERSION
        self.stage = FrameStage.HEADER_BYTE
        self.offset = offset
        super().__init__(
            f"unsupported framing version: {self.stage.value} at offset {offset} is "
            f"0x{got:02x}, expected 0x{FRAMING_VERSION:02x}"
        )


class FrameTooLarge(FramingError):
    """A body length over the cap (declared in a header, or handed to a writer).

    ``offset`` is where the frame starts (its framing byte).
    """

    def __init__(self, length: int, cap: int, offset: int) -> None:
        self.length = length
        self.cap = cap
        self.stage = FrameStage.LENGTH
        self.offset = offset
        super().__init__(
            f"frame too large: {self.stage.value} of the frame at offset {offset} "
            f"declares {length} body bytes, over the {cap}-byte cap"
        )


class TruncatedFrame(FramingError):
    """The stream or buffer ended inside a frame.

    ``received`` of ``expected`` bytes of ``stage`` arrived; ``offset`` is where
    that stage starts.
    """

    def __init__(self, stage: FrameStage, received: int, expected: int, offset: int) -> None:
        self.stage = stage
        self.received = received
        self.expected = expected
        self.offset = offset
        super().__init__(
            f"truncated frame: stream ended in the {stage.value} at offset {offset} "
            f"after {received} of {expected} bytes"
        )


def encode_framed(body: bytes) -> bytes:
    """Return header + body. Raises ``FrameTooLarge`` (nothing produced) over 16 MiB."""
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(len(body), MAX_FRAME_BYTES, 0)
    return _HEADER.pack(FRAMING_VERSION, len(body)) + body


def _check_framing_byte(value: int, offset: int) -> None:
    if value != FRAMING_VERSION:
        raise BadFramingByte(value, offset)


def _check_length(length: int, cap: int, offset: int) -> int:
    if length > cap:
        raise FrameTooLarge(length, cap, offset)
    return length


def parse_header(header: bytes, cap: int, offset: int = 0) -> int:
    """Check a 5-byte header and return the body length it declares.

    The framing byte is checked first, then the length against ``cap``; this is all
    a reader needs before deciding whether to read (or allocate) the body.
    ``offset`` is the stream offset of the header, used only in error messages.
    A header shorter than 5 bytes raises ``TruncatedFrame`` for the missing stage;
    a longer one is a caller bug (``ValueError``).
    """
    if len(header) > FRAME_HEADER_BYTES:
        raise ValueError(f"a frame header is {FRAME_HEADER_BYTES} bytes, got {len(header)}")
    if not header:
        raise TruncatedFrame(FrameStage.HEADER_BYTE, 0, 1, offset)
    _check_framing_byte(header[0], offset)
    if len(header) < FRAME_HEADER_BYTES:
        raise TruncatedFrame(FrameStage.LENGTH, len(header) - 1, _LENGTH_BYTES, offset + 1)
    (length,) = _LENGTH.unpack_from(header, 1)
    return _check_length(length, cap, offset)


class FrameDecoder:
    """Incremental frame decoder for bytes that arrive in arbitrary chunks.

    ``feed`` buffers bytes and splits off every complete frame; the bodies queue
    up for ``next_body`` / iteration. Headers are checked the moment their bytes
    arrive: a bad framing byte as soon as it is fed, a length over ``cap`` as soon
    as its four bytes are fed, so the decoder never waits for (or buffers) more
    than header + ``cap`` bytes of one frame.

    A failure poisons the decoder: ``feed`` raises it at once and again on every
    later call. Bodies that completed before the bad header stay queued;
    ``next_body`` hands them out first and then raises the failure.

    Not thread-safe; one decoder per stream.
    """

    def __init__(self, cap: int = MAX_FRAME_BYTES) -> None:
        if cap < 0:
            raise ValueError(f"cap must be >= 0, got {cap}")
        self._cap = cap
        self._buffer = bytearray()  # the partial frame (never a complete one)
        self._buffer_offset = 0  # stream offset of _buffer[0]
        self._body_length: int | None = None  # set once the partial frame's header is checked
        self._ready: deque[bytes] = deque()
        self._error: FramingError | None = None

    @property
    def cap(self) -> int:
        """Largest body length (bytes) this decoder accepts."""
        return self._cap

    @property
    def pending_bytes(self) -> int:
        """Bytes of the incomplete frame buffered so far (queued bodies not counted)."""
        return len(self._buffer)

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet split into a complete frame."""
        return self._buffer_offset

    @property
    def error(self) -> FramingError | None:
        """The failure that poisoned this decoder, if any."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` and split off every frame it completes.

        Raises the first ``FramingError`` found (and every time after that).
        """
        if self._error is not None:
            raise self._error.with_traceback(None)  # same error; do not grow its traceback
        self._buffer += data
        try:
            self._split()
        except FramingError as exc:
            self._poison(exc)
            raise

    def _poison(self, exc: FramingError) -> None:
        self._error = exc
        self._buffer = bytearray()

    def _split(self) -> None:
        buffer = self._buffer
        position = 0
        try:
            while True:
                available = len(buffer) - position
                if self._body_length is None:
                    if available < 1:
                        return
                    _check_framing_byte(buffer[position], self._buffer_offset + position)
                    if available < FRAME_HEADER_BYTES:
                        return
                    (length,) = _LENGTH.unpack_from(buffer, position + 1)
                    self._body_length = _check_length(
                        length, self._cap, self._buffer_offset + position
                    )
                end = position + FRAME_HEADER_BYTES + self._body_length
                if len(buffer) < end:
                    return
                self._ready.append(bytes(buffer[position + FRAME_HEADER_BYTES : end]))
                self._body_length = None
                position = end
        finally:
            if position:
                del buffer[:position]
                self._buffer_offset += position

    def next_body(self) -> bytes | None:
        """Pop the next complete body; ``None`` if none is complete yet.

        Once the queue is empty, a poisoned decoder raises its failure instead.
        """
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error.with_traceback(None)  # same error; do not grow its traceback
        return None

    def __iter__(self) -> Iterator[bytes]:
        """Yield every complete body currently queued (then raise if poisoned)."""
        while (body := self.next_body()) is not None:
            yield body

    def finish(self) -> None:
        """Declare end of stream: raise ``TruncatedFrame`` if a partial frame is buffered.

        Queued complete bodies are not affected; fetch them with ``next_body``.
        A truncation poisons the decoder like any other failure.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)  # same error; do not grow its traceback
        if not self._buffer:
            return
        received = len(self._buffer)
        if self._body_length is not None:
            exc = TruncatedFrame(
                FrameStage.BODY,
                received - FRAME_HEADER_BYTES,
                self._body_length,
                self._buffer_offset + FRAME_HEADER_BYTES,
            )
        else:
            exc = TruncatedFrame(
                FrameStage.LENGTH, received - 1, _LENGTH_BYTES, self._buffer_offset + 1
            )
        self._poison(exc)
        raise exc


async def read_exactly(
    stream: trio.abc.ReceiveStream, n: int, stage: FrameStage, offset: int = 0
) -> bytes:
    """Read exactly ``n`` bytes, asking for no more than are still missing.

    Each ``receive_some`` is bounded by the remaining count, so not one byte past
    ``n`` is taken from the stream. EOF before ``n`` bytes raises ``TruncatedFrame``
    for ``stage`` (``offset`` is where this read starts, for the message).

    Cancellation: a cancelled call may already have consumed part of the ``n``
    bytes; they are lost, and the stream is no longer positioned on a frame
    boundary.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chunks = bytearray()
    while len(chunks) < n:
        remaining = n - len(chunks)
        chunk = await stream.receive_some(remaining)
        if not chunk:
            raise TruncatedFrame(stage, len(chunks), n, offset)
        if len(chunk) > remaining:
            raise RuntimeError(
                f"{type(stream).__name__}.receive_some({remaining}) returned {len(chunk)} bytes"
            )
        chunks += chunk
    return bytes(chunks)


async def read_frame_body(
    stream: trio.abc.ReceiveStream, cap: int = MAX_FRAME_BYTES, *, offset: int = 0
) -> bytes:
    """Read exactly one frame from ``stream`` and return its body; not a byte more.

    Reads the header with one receive of at most 5 bytes (the framing byte is
    checked as soon as it is there, the length against ``cap`` once complete),
    then the body. The body is neither read nor allocated unless its
    length is within ``cap``. Bytes after the frame stay in the stream: after a
    Hello they belong to whichever process ends up owning the socket. ``offset``
    is the stream offset of this frame, used only in error messages.

    Raises ``BadFramingByte``, ``FrameTooLarge`` or ``TruncatedFrame``.

    Cancellation: a cancelled read may have consumed part of a frame (header
    and/or some body bytes). The stream is then unusable for framing; close it.
    """
    # One receive asks for the whole header (never more); the framing byte is
    # checked as soon as it is there, before waiting for the length.
    header = await stream.receive_some(FRAME_HEADER_BYTES)
    if not header:
        raise TruncatedFrame(FrameStage.HEADER_BYTE, 0, 1, offset)
    if len(header) > FRAME_HEADER_BYTES:
        raise RuntimeError(
            f"{type(stream).__name__}.receive_some({FRAME_HEADER_BYTES}) "
            f"returned {len(header)} bytes"
        )
    _check_framing_byte(header[0], offset)
    while len(header) < FRAME_HEADER_BYTES:
        more = await stream.receive_some(FRAME_HEADER_BYTES - len(header))
        if not more:
            raise TruncatedFrame(FrameStage.LENGTH, len(header) - 1, _LENGTH_BYTES, offset + 1)
        header = bytes(header) + bytes(more)
    (length,) = _LENGTH.unpack_from(header, 1)
    _check_length(length, cap, offset)
    return await read_exactly(stream, length, FrameStage.BODY, offset + FRAME_HEADER_BYTES)


async def write_frame_body(stream: trio.abc.SendStream, body: bytes) -> None:
    """Write header + ``body`` with one ``send_all``.

    Raises ``FrameTooLarge`` before writing anything when ``body`` exceeds 16 MiB.

    Cancellation: a cancelled ``send_all`` may have written part of the frame; the
    peer then sees a truncated frame and the stream is unusable for framing.
    """
    await stream.send_all(encode_framed(body))
