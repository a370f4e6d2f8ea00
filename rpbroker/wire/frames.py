"""Protobuf bodies of the broker v1 wire: decode, encode, build and check ``Frame``s.

What this module does: decodes bytes into generated message classes, turning
every decoder failure into ``MalformedMessage`` (unknown fields are skipped, as
proto3 requires, and dropped, as the v1 decoder does); encodes canonically
(default values omitted, fields ascending, map keys sorted); builds the REQUEST /
RESPONSE / EVENT envelopes with the v1 defaults; checks an envelope in the fixed
v1 order (version, kind, payload protocol, encoding); and writes the production
Unix ``HandoffOffer`` payload, which carries an explicit ``handle_value`` even
when it is 0.

What it does not do: framing (``rpbroker.wire.framing``), I/O, or any policy
about what a fault means for a connection (the Hello, admin and handoff paths
decide that).
"""

from __future__ import annotations

import enum
from typing import TypeVar

from google.protobuf.message import Message

from rpbroker.wire._pb import broker_v1_pb2 as _v1
from rpbroker.wire.codes import PROTOCOL_VERSION, FrameKind, PayloadEncoding
from rpbroker.wire.framing import encode_framed
from rpbroker.wire.protocols import PayloadProtocol, protocol_name

Frame = _v1.Frame
HandoffOffer = _v1.HandoffOffer

T = TypeVar("T", bound=Message)

#: Largest value a protobuf varint can carry here (uint64); larger is a caller bug.
_MAX_UINT64 = (1 << 64) - 1


class MalformedMessage(Exception):
    """Bytes that do not decode as ``message_name`` (or violate its lane's rules)."""

    def __init__(self, message_name: str, detail: str) -> None:
        self.message_name = message_name
        self.detail = detail
        super().__init__(f"malformed {message_name}: {detail}")


def decode(cls: type[T], data: bytes) -> T:
    """Decode ``data`` as ``cls``; any decoder failure becomes ``MalformedMessage``.

    Unknown fields are skipped and then discarded, as the v1 (prost) decoder does:
    a newer peer's extra fields never fail a decode, never take part in equality
    and are not re-emitted by ``encode``. Unknown enum numbers are kept as ints.
    """
    message = cls()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # DecodeError, RecursionError, anything the runtime raises
        raise MalformedMessage(cls.DESCRIPTOR.name, str(exc) or type(exc).__name__) from exc
    message.DiscardUnknownFields()
    return message


def decode_frame(body: bytes) -> _v1.Frame:
    """Decode a frame body (the bytes inside the 5-byte header) as ``Frame``."""
    return decode(_v1.Frame, body)


def encode(message: Message) -> bytes:
    """Canonical proto3 bytes: defaults omitted, ascending field order, sorted map keys."""
    return message.SerializeToString(deterministic=True)


def encode_varint(value: int) -> bytes:
    """Base-128 varint of an unsigned 64-bit integer (``300`` -> ``ac 02``)."""
    if not 0 <= value <= _MAX_UINT64:
        raise ValueError(f"varint value out of uint64 range: {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _frame(
    kind: FrameKind,
    payload_protocol: int,
    payload: bytes,
    *,
    request_id: int,
    deadline_unix_ms: int = 0,
    traceparent: str = "",
    tracestate: str = "",
) -> _v1.Frame:
    return _v1.Frame(
        envelope_version=PROTOCOL_VERSION,
        kind=_v1.FrameKind.ValueType(kind),
        payload_protocol=payload_protocol,
        payload=payload,
        request_id=request_id,
        payload_encoding=_v1.PayloadEncoding.ValueType(PayloadEncoding.NONE),
        deadline_unix_ms=deadline_unix_ms,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def request(
    payload_protocol: int,
    payload: bytes,
    *,
    request_id: int = 0,
    deadline_unix_ms: int = 0,
    traceparent: str = "",
    tracestate: str = "",
) -> _v1.Frame:
    """A v1 REQUEST frame, encoding NONE."""
    return _frame(
        FrameKind.REQUEST,
        payload_protocol,
        payload,
        request_id=request_id,
        deadline_unix_ms=deadline_unix_ms,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def response_to(
    request: _v1.Frame,
    payload: bytes,
    *,
    payload_protocol: int | None = None,
    deadline_unix_ms: int = 0,
) -> _v1.Frame:
    """The RESPONSE to ``request``: same lane unless given, echoing id and trace context.

    ``deadline_unix_ms`` (0: none) states a deadline the reply commits to; the
    broker puts a handoff's adoption deadline there.
    """
    return _frame(
        FrameKind.RESPONSE,
        request.payload_protocol if payload_protocol is None else payload_protocol,
        payload,
        request_id=request.request_id,
        deadline_unix_ms=deadline_unix_ms,
        traceparent=request.traceparent,
        tracestate=request.tracestate,
    )


def event(payload_protocol: int, payload: bytes, *, request_id: int = 0) -> _v1.Frame:
    """A v1 EVENT frame (e.g. the handoff-ready notice), encoding NONE."""
    return _frame(FrameKind.EVENT, payload_protocol, payload, request_id=request_id)


def framed(frame: _v1.Frame) -> bytes:
    """``frame`` encoded and framed, ready to write."""
    return encode_framed(encode(frame))


class EnvelopeFault(enum.Enum):
    """The first envelope check a frame failed, in the fixed v1 order."""

    VERSION = "envelope_version"
    KIND = "kind"
    PROTOCOL = "payload_protocol"
    ENCODING = "payload_encoding"

    @property
    def message(self) -> str:
        """A description that needs no context (KIND/PROTOCOL: see ``describe``)."""
        return {
            EnvelopeFault.VERSION: "envelope_version is not v1",
            EnvelopeFault.KIND: "kind is not the expected kind",
            EnvelopeFault.PROTOCOL: "payload_protocol is not the expected protocol",
            EnvelopeFault.ENCODING: "payload is compressed",
        }[self]

    def describe(self, expected_kind: FrameKind, expected_protocol: int) -> str:
        """The exact v1 wording: ``kind is not REQUEST``, ``payload_protocol is not handoff``."""
        if self is EnvelopeFault.KIND:
            return f"kind is not {FrameKind(expected_kind).name}"
        if self is EnvelopeFault.PROTOCOL:
            return f"payload_protocol is not {protocol_name(expected_protocol)}"
        return self.message


def check_envelope(
    frame: _v1.Frame, *, kind: FrameKind, payload_protocol: int
) -> EnvelopeFault | None:
    """The first failing check among version, kind, protocol, encoding; ``None`` if valid.

    An unknown numeric kind fails the kind check; any encoding other than NONE
    fails the last one (v1 never accepts compressed payloads).
    """
    if frame.envelope_version != PROTOCOL_VERSION:
        return EnvelopeFault.VERSION
    if int(frame.kind) != kind:
        return EnvelopeFault.KIND
    if frame.payload_protocol != payload_protocol:
        return EnvelopeFault.PROTOCOL
    if int(frame.payload_encoding) != PayloadEncoding.NONE:
        return EnvelopeFault.ENCODING
    return None


def encode_handoff_offer_with_attachment(offer: _v1.HandoffOffer) -> bytes:
    """The production ``HandoffOffer`` payload: ``08 <varint handle_value>`` + the rest.

    Field 1 is always written first and explicitly, even when 0 (Unix sends
    ``08 00``, which a canonical encoder would omit); the other fields follow in
    canonical form. ``decode(HandoffOffer, ...)`` reads this and the canonical form
    alike.
    """
    rest = _v1.HandoffOffer()
    rest.CopyFrom(offer)
    rest.ClearField("handle_value")
    return b"\x08" + encode_varint(offer.handle_value) + encode(rest)


def handoff_offer_frame(offer: _v1.HandoffOffer, *, explicit_handle: bool = True) -> _v1.Frame:
    """The REQUEST on 0xD0FF carrying ``offer``, ``request_id = offer.correlation_id``.

    ``explicit_handle`` picks the production payload (see
    ``encode_handoff_offer_with_attachment``) over the canonical one.
    """
    payload = encode_handoff_offer_with_attachment(offer) if explicit_handle else encode(offer)
    return request(PayloadProtocol.HANDOFF, payload, request_id=offer.correlation_id)
