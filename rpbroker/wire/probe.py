"""Wire format of the endpoint identity probe (payload protocol 0xB232).

What this module does: builds and parses the two frames of a probe, and
recognises a probe request at the start of a byte stream. The prober sends a
REQUEST whose payload is a fresh 32-byte nonce and whose ``request_id`` is the
first 8 nonce bytes read as a little-endian u64 (the v1 reference's form; a
request_id of 0 is just as valid); the backend answers with a RESPONSE that
echoes the request_id and trace context and whose payload is the nonce followed
by the encoded ``DaemonProcess`` describing itself. ``sniff_probe_request`` is a
pure decision over the bytes a connection has sent so far: a probe request,
certainly not one, or how many more bytes may be read without passing the end of
the shortest probe frame still possible.

What it does not do: generate nonces, perform I/O or time out (v1 uses 500 ms),
or compare the returned identity with the process behind the endpoint (pid,
executable, exe hash, boot id): ``rpbroker.identity`` does that.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from rpbroker.wire._pb import broker_v1_pb2 as _v1
from rpbroker.wire.codes import FRAMING_VERSION, FrameKind
from rpbroker.wire.frames import (
    MalformedMessage,
    check_envelope,
    decode,
    decode_frame,
    encode,
    framed,
    request,
    response_to,
)
from rpbroker.wire.framing import FRAME_HEADER_BYTES
from rpbroker.wire.protocols import PayloadProtocol

#: Nonce length (bytes): 256 random bits, so a stale or foreign endpoint cannot echo
#: a nonce it has not just been sent.
PROBE_NONCE_BYTES: Final = 32

#: The first 8 body bytes of every probe request a proto3 encoder writes: fields in
#: ascending order, envelope_version 1, payload_protocol 0xB232, payload tag and
#: length 32. Kind REQUEST (0) is a default, so it is never encoded.
PROBE_REQUEST_BODY_PREFIX: Final = bytes.fromhex("0801" + "18b2e402" + "2220")

#: Smallest probe request body (bytes): the prefix and the nonce (request_id 0).
PROBE_REQUEST_MIN_BODY_BYTES: Final = len(PROBE_REQUEST_BODY_PREFIX) + PROBE_NONCE_BYTES

#: Largest probe request body recognised (bytes). The reference sends at most 51
#: (a request_id varint of up to 10 bytes); the rest leaves room for a deadline and
#: W3C trace context (a traceparent is 55 characters). It fits the length's low
#: byte, so a probe's header is ``01 nn 00 00 00`` and the second byte decides.
PROBE_REQUEST_MAX_BODY_BYTES: Final = 255

#: The request_id the reference derives from a nonce: its first 8 bytes as a u64.
_U64_LE: Final = struct.Struct("<Q")


class ProbeNonceMismatch(MalformedMessage):
    """A probe reply that does not begin with the nonce that was sent."""


@attrs.frozen
class ProbeRequestSeen:
    """The bytes begin with a complete, valid probe request ``frame_bytes`` long."""

    frame: _v1.Frame
    frame_bytes: int


@attrs.frozen
class NotAProbe:
    """The bytes cannot be the start of a probe request: they belong to the application."""


@attrs.frozen
class NeedMoreBytes:
    """Still possibly a probe: up to ``at_most`` more bytes may be read.

    Reading ``at_most`` more never passes the end of the shortest probe frame that
    the bytes so far allow, so nothing that follows a probe is ever consumed.
    """

    at_most: int


ProbeSniff = ProbeRequestSeen | NotAProbe | NeedMoreBytes


def probe_request_id(nonce: bytes) -> int:
    """The request_id the reference sends with ``nonce``: its first 8 bytes, little-endian."""
    return int(_U64_LE.unpack_from(nonce)[0])


def _check_nonce(nonce: bytes, message_name: str) -> None:
    if len(nonce) != PROBE_NONCE_BYTES:
        raise MalformedMessage(
            message_name, f"probe nonce is {len(nonce)} bytes, expected {PROBE_NONCE_BYTES}"
        )


def probe_request_frame(nonce: bytes, *, request_id: int | None = None) -> bytes:
    """The framed probe REQUEST carrying ``nonce`` (32 bytes, else ValueError).

    ``request_id`` defaults to ``probe_request_id(nonce)``, as the reference sends it.
    """
    if len(nonce) != PROBE_NONCE_BYTES:
        raise ValueError(f"probe nonce must be {PROBE_NONCE_BYTES} bytes, got {len(nonce)}")
    rid = probe_request_id(nonce) if request_id is None else request_id
    return framed(request(PayloadProtocol.PROBE, nonce, request_id=rid))


def _probe_request(body: bytes) -> _v1.Frame:
    frame = decode_frame(body)
    fault = check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.PROBE)
    if fault is not None:
        raise MalformedMessage(
            "probe request", fault.describe(FrameKind.REQUEST, PayloadProtocol.PROBE)
        )
    _check_nonce(frame.payload, "probe request")
    return frame


def parse_probe_request(body: bytes) -> bytes:
    """The nonce of a probe request body; ``MalformedMessage`` if it is not one.

    Valid means: envelope_version 1, kind REQUEST, payload_protocol 0xB232, encoding
    NONE, a 32-byte payload; any request_id, deadline and trace context.
    """
    return bytes(_probe_request(body).payload)


def sniff_probe_request(data: bytes) -> ProbeSniff:
    """Decide whether ``data``, the first bytes a connection sent, start a probe request.

    A probe request here is a v1 frame (``01``, u32 LE length) whose body starts
    with ``PROBE_REQUEST_BODY_PREFIX``, is between ``PROBE_REQUEST_MIN_BODY_BYTES``
    and ``PROBE_REQUEST_MAX_BODY_BYTES`` long and is a valid probe request
    (``parse_probe_request``). Bytes after the first frame are ignored. Pure: the
    answer depends on ``data`` alone.
    """
    if data and data[0] != FRAMING_VERSION:
        return NotAProbe()
    if len(data) > 1 and not (
        PROBE_REQUEST_MIN_BODY_BYTES <= data[1] <= PROBE_REQUEST_MAX_BODY_BYTES
    ):
        return NotAProbe()
    if any(data[2:FRAME_HEADER_BYTES]):
        return NotAProbe()  # a body of 256 bytes or more
    if len(data) < FRAME_HEADER_BYTES:
        return NeedMoreBytes(FRAME_HEADER_BYTES + PROBE_REQUEST_MIN_BODY_BYTES - len(data))
    body_prefix = data[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + len(PROBE_REQUEST_BODY_PREFIX)]
    if body_prefix != PROBE_REQUEST_BODY_PREFIX[: len(body_prefix)]:
        return NotAProbe()
    frame_bytes = FRAME_HEADER_BYTES + data[1]
    if len(data) < frame_bytes:
        return NeedMoreBytes(frame_bytes - len(data))
    try:
        frame = _probe_request(bytes(data[FRAME_HEADER_BYTES:frame_bytes]))
    except MalformedMessage:
        return NotAProbe()
    return ProbeRequestSeen(frame, frame_bytes)


def probe_reply_frame(request: _v1.Frame, identity: _v1.DaemonProcess) -> bytes:
    """The framed RESPONSE to ``request``: its nonce, then the encoded ``identity``.

    ``request`` must carry a 32-byte nonce (``MalformedMessage`` otherwise); its
    request_id and trace context are echoed; the deadline is not.
    """
    _check_nonce(request.payload, "probe request")
    return framed(response_to(request, request.payload + encode(identity)))


def parse_probe_reply(
    body: bytes, nonce: bytes, *, request_id: int | None = None
) -> _v1.DaemonProcess:
    """The ``DaemonProcess`` in a probe reply body, after checking it echoes ``nonce``.

    When ``request_id`` is given the reply must echo it too (the reference checks
    it). Raises ``MalformedMessage`` for a bad envelope, request_id or identity,
    and its subclass ``ProbeNonceMismatch`` when the echoed nonce differs.
    """
    frame = decode_frame(body)
    fault = check_envelope(frame, kind=FrameKind.RESPONSE, payload_protocol=PayloadProtocol.PROBE)
    if fault is not None:
        raise MalformedMessage(
            "probe reply", fault.describe(FrameKind.RESPONSE, PayloadProtocol.PROBE)
        )
    if request_id is not None and frame.request_id != request_id:
        raise MalformedMessage("probe reply", "request_id does not match the probe request")
    payload = frame.payload
    if len(payload) < PROBE_NONCE_BYTES:
        raise MalformedMessage(
            "probe reply", f"payload is {len(payload)} bytes, shorter than the nonce"
        )
    if payload[:PROBE_NONCE_BYTES] != nonce:
        raise ProbeNonceMismatch("probe reply", "the echoed nonce is not the one sent")
    return decode(_v1.DaemonProcess, payload[PROBE_NONCE_BYTES:])
