"""Frame builders, the envelope check order, MalformedMessage, varints and the Unix
HandoffOffer quirk (explicit ``08 00``), against hand-derived bytes."""

from __future__ import annotations

import pytest

from rpbroker import wire
from rpbroker.wire import EnvelopeFault, FrameKind, MalformedMessage, PayloadEncoding
from rpbroker.wire._pb import broker_v1_pb2 as v1

H = bytes.fromhex
TOKEN = bytes(range(16))
TOKEN_HEX = TOKEN.hex()


# --- builders -----------------------------------------------------------------------


def test_admin_status_json_request_vector() -> None:
    payload = wire.encode(wire.AdminRequest(verb=v1.ADMIN_VERB_STATUS, json=True))
    assert payload == H("08011001")
    frame = wire.request(wire.PayloadProtocol.ADMIN, payload, request_id=1)
    assert wire.encode(frame) == H("08011881da022204080110012801")


def test_request_defaults() -> None:
    frame = wire.request(0x1234, b"")
    assert frame.envelope_version == 1
    assert frame.kind == v1.FRAME_KIND_REQUEST
    assert frame.payload_encoding == v1.PAYLOAD_ENCODING_NONE
    assert (frame.request_id, frame.deadline_unix_ms, frame.traceparent, frame.tracestate) == (
        0,
        0,
        "",
        "",
    )
    # REQUEST (0) and request_id 0 are defaults: not on the wire.
    assert wire.encode(frame) == H("0801 18b424")


def test_request_carries_deadline_and_trace_context() -> None:
    frame = wire.request(
        0, b"p", request_id=9, deadline_unix_ms=2, traceparent="00-ab", tracestate="k=v"
    )
    assert wire.encode(frame) == H("0801 220170 2809 3802 4205 30302d6162 4a03 6b3d76")


def test_response_to_echoes_id_protocol_and_trace_context() -> None:
    req = wire.request(0xAD01, b"q", request_id=44, deadline_unix_ms=99, tracestate="ts=1")
    req.traceparent = "tp"
    resp = wire.response_to(req, b"answer")
    assert resp.kind == v1.FRAME_KIND_RESPONSE
    assert resp.payload_protocol == 0xAD01
    assert resp.request_id == 44
    assert (resp.traceparent, resp.tracestate) == ("tp", "ts=1")
    assert resp.deadline_unix_ms == 0  # a deadline is not echoed
    assert resp.payload == b"answer"
    assert resp.envelope_version == 1
    other = wire.response_to(req, b"", payload_protocol=0x0000)
    assert other.payload_protocol == 0
    assert other.request_id == 44


def test_handoff_ack_and_ready_relay_vectors() -> None:
    ack = wire.encode(wire.HandoffAck(token=TOKEN, accepted=True, correlation_id=1))
    assert ack == H("0a10" + TOKEN_HEX + "1001 2001")
    offer_frame = wire.request(wire.PayloadProtocol.HANDOFF, b"", request_id=1)
    ack_body = wire.encode(wire.response_to(offer_frame, ack))
    assert ack_body == H("0801100118ffa10322160a10" + TOKEN_HEX + "100120012801")
    relay = wire.event(wire.PayloadProtocol.HANDOFF, ack, request_id=1)
    assert wire.encode(relay) == H("0801100218ffa10322160a10" + TOKEN_HEX + "100120012801")


def test_framed_is_header_plus_encoding() -> None:
    frame = wire.event(0xF1C0, b"z")
    body = wire.encode(frame)
    assert wire.framed(frame) == bytes([1]) + len(body).to_bytes(4, "little") + body
    assert wire.decode_frame(wire.framed(frame)[5:]) == frame


# --- Unix HandoffOffer quirk ---------------------------------------------------------

UNIX_OFFER = wire.HandoffOffer(token=TOKEN, service_name="build-cache", correlation_id=1)
UNIX_PAYLOAD = H("0800 1210" + TOKEN_HEX + "1a0b6275696c642d6361636865 2001")
UNIX_BODY = H("080118ffa1032223") + UNIX_PAYLOAD + H("2801")


def test_unix_offer_payload_has_explicit_zero_handle() -> None:
    assert wire.encode_handoff_offer_with_attachment(UNIX_OFFER) == UNIX_PAYLOAD
    # The canonical encoding is the same minus the leading 08 00.
    assert wire.encode(UNIX_OFFER) == UNIX_PAYLOAD[2:]


def test_unix_offer_frame_body_and_framed_bytes() -> None:
    frame = wire.handoff_offer_frame(UNIX_OFFER)
    assert wire.encode(frame) == UNIX_BODY
    assert len(UNIX_BODY) == 45
    assert wire.framed(frame) == H("012d000000") + UNIX_BODY


def test_offer_decodes_the_same_from_both_forms() -> None:
    explicit = wire.decode(wire.HandoffOffer, UNIX_PAYLOAD)
    canonical = wire.decode(wire.HandoffOffer, wire.encode(UNIX_OFFER))
    assert explicit == canonical == UNIX_OFFER
    canonical_frame = wire.handoff_offer_frame(UNIX_OFFER, explicit_handle=False)
    assert wire.encode(canonical_frame) == H("080118ffa1032221") + UNIX_PAYLOAD[2:] + H("2801")


def test_windows_style_handle_is_written_first_and_canonically() -> None:
    offer = wire.HandoffOffer(handle_value=300, token=TOKEN, correlation_id=7)
    payload = wire.encode_handoff_offer_with_attachment(offer)
    assert payload[:3] == H("08ac02")
    assert payload == wire.encode(offer)


@pytest.mark.parametrize(
    "value,hex_bytes",
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (300, "ac02"),
        (0xB232, "b2e402"),
        (2**64 - 1, "ffffffffffffffffff01"),
    ],
)
def test_encode_varint(value: int, hex_bytes: str) -> None:
    assert wire.encode_varint(value) == H(hex_bytes)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_encode_varint_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        wire.encode_varint(value)


# --- decoding failures --------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,data",
    [
        (wire.Frame, H("ffffff")),  # the v1 "malformed broker Frame" sample
        (wire.Frame, H("2205 6869")),  # bytes field longer than the input
        (wire.Hello, H("1a02 c328")),  # service_name is not UTF-8
        (wire.HandoffOffer, H("08")),  # varint cut off
        (wire.AdminRequest, H("0f")),  # wire type 7 does not exist
    ],
)
def test_undecodable_bytes_raise_malformed_message(cls: type[wire.Frame], data: bytes) -> None:
    with pytest.raises(MalformedMessage) as caught:
        wire.decode(cls, data)
    assert caught.value.message_name == cls.DESCRIPTOR.name
    assert str(caught.value).startswith(f"malformed {cls.DESCRIPTOR.name}: ")


def test_decode_frame_raises_malformed_frame() -> None:
    with pytest.raises(MalformedMessage) as caught:
        wire.decode_frame(H("ffffff"))
    assert caught.value.message_name == "Frame"


def test_empty_bytes_decode_to_defaults() -> None:
    assert wire.decode(wire.Hello, b"") == wire.Hello()


# --- envelope check -----------------------------------------------------------------


def _bad_everywhere() -> wire.Frame:
    frame = wire.response_to(wire.request(0x0000, b""), b"")  # kind RESPONSE, protocol 0
    frame.envelope_version = 2
    frame.payload_encoding = v1.PAYLOAD_ENCODING_ZSTD
    return frame


def test_envelope_checks_run_in_the_fixed_order() -> None:
    def check(frame: wire.Frame) -> EnvelopeFault | None:
        return wire.check_envelope(
            frame, kind=FrameKind.REQUEST, payload_protocol=wire.PayloadProtocol.HANDOFF
        )

    frame = _bad_everywhere()
    assert check(frame) is EnvelopeFault.VERSION
    frame.envelope_version = 1
    assert check(frame) is EnvelopeFault.KIND
    frame.kind = v1.FRAME_KIND_REQUEST
    assert check(frame) is EnvelopeFault.PROTOCOL
    frame.payload_protocol = 0xD0FF
    assert check(frame) is EnvelopeFault.ENCODING
    frame.payload_encoding = v1.PAYLOAD_ENCODING_NONE
    assert check(frame) is None


def test_unknown_numeric_kind_fails_the_kind_check() -> None:
    frame = wire.decode_frame(H("0801 1007 18ffa103"))  # kind 7
    assert (
        wire.check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=0xD0FF)
        is EnvelopeFault.KIND
    )


@pytest.mark.parametrize(
    "encoding", [PayloadEncoding.ZSTD, PayloadEncoding.SNAPPY, PayloadEncoding.LZ4]
)
def test_every_compressed_encoding_is_refused(encoding: PayloadEncoding) -> None:
    frame = wire.request(0xAD01, b"")
    frame.payload_encoding = v1.PayloadEncoding.ValueType(encoding)
    assert (
        wire.check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=0xAD01)
        is EnvelopeFault.ENCODING
    )


def test_envelope_fault_wording() -> None:
    handoff = wire.PayloadProtocol.HANDOFF
    assert EnvelopeFault.VERSION.message == "envelope_version is not v1"
    assert EnvelopeFault.ENCODING.message == "payload is compressed"
    assert EnvelopeFault.KIND.describe(FrameKind.REQUEST, handoff) == "kind is not REQUEST"
    assert EnvelopeFault.KIND.describe(FrameKind.EVENT, handoff) == "kind is not EVENT"
    assert (
        EnvelopeFault.PROTOCOL.describe(FrameKind.REQUEST, handoff)
        == "payload_protocol is not handoff"
    )
    assert (
        EnvelopeFault.PROTOCOL.describe(FrameKind.REQUEST, 0xF1C0)
        == "payload_protocol is not rpbroker.lifecycle"
    )
    assert (
        EnvelopeFault.VERSION.describe(FrameKind.REQUEST, handoff) == "envelope_version is not v1"
    )
    assert all(fault.message for fault in EnvelopeFault)
