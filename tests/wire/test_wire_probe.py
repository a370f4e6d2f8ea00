"""The endpoint identity probe (0xB232): request forms, sniffing, nonce and request_id echo."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpbroker import wire
from rpbroker.wire import (
    PROBE_NONCE_BYTES,
    PROBE_REQUEST_BODY_PREFIX,
    PROBE_REQUEST_MAX_BODY_BYTES,
    PROBE_REQUEST_MIN_BODY_BYTES,
    MalformedMessage,
    NeedMoreBytes,
    NotAProbe,
    ProbeNonceMismatch,
    ProbeRequestSeen,
    parse_probe_reply,
    parse_probe_request,
    probe_reply_frame,
    probe_request_frame,
    probe_request_id,
    sniff_probe_request,
)
from rpbroker.wire._pb import broker_v1_pb2 as v1

H = bytes.fromhex
NONCE = bytes(range(100, 132))
IDENTITY = wire.DaemonProcess(
    pid=4242,
    exe_path="/opt/zccache/bin/zccache",
    ipc_endpoint=wire.Endpoint(namespace_id="shared", path="/run/rpb-v1-be-00"),
    started_at_unix_ms=1_700_000_000_000,
    boot_id="boot",
    idle_timeout_secs=30,
    exe_hash_algorithm="blake3",
    exe_hash=bytes(32),
)


def is_probe_frame(data: bytes) -> bool:
    """Independent oracle: ``data`` starts with a canonical, valid framed probe request."""
    if len(data) < 5 or data[0] != 1:
        return False
    (length,) = struct.unpack("<I", data[1:5])
    if not PROBE_REQUEST_MIN_BODY_BYTES <= length <= PROBE_REQUEST_MAX_BODY_BYTES:
        return False
    body = data[5 : 5 + length]
    if len(body) < length or not body.startswith(H("0801 18b2e402 2220")):
        return False
    try:
        parse_probe_request(body)
    except MalformedMessage:
        return False
    return True


def test_body_prefix_is_the_hand_derived_8_bytes() -> None:
    # envelope_version 1 | payload_protocol 0xB232 | payload tag, length 32
    assert H("0801 18b2e402 2220") == PROBE_REQUEST_BODY_PREFIX
    assert PROBE_REQUEST_MIN_BODY_BYTES == 40


def test_request_id_is_the_first_8_nonce_bytes_little_endian() -> None:
    assert probe_request_id(bytes(range(1, 33))) == 0x0807060504030201
    assert probe_request_id(bytes(32)) == 0
    assert probe_request_id(b"\xff" * 32) == 2**64 - 1


def test_default_request_is_the_reference_form_golden_bytes() -> None:
    nonce = bytes(range(1, 33))
    # request_id 0x0807060504030201 as a varint (9 bytes) after field tag 5 (0x28).
    body = H("0801 18b2e402 2220") + nonce + H("28 81 84 8c a0 d0 c0 c1 83 08")
    assert len(body) == 50
    assert probe_request_frame(nonce) == H("0132000000") + body


@pytest.mark.parametrize(
    ("nonce", "body_bytes"),
    [(bytes(32), 40), (b"\x01" + bytes(31), 42), (NONCE, 50), (b"\xff" * 32, 51)],
    ids=["zero-id", "one-byte-id", "typical", "largest-id"],
)
def test_request_sizes_of_the_reference_form(nonce: bytes, body_bytes: int) -> None:
    framed = probe_request_frame(nonce)
    assert len(framed) == 5 + body_bytes
    frame = wire.decode_frame(framed[5:])
    assert frame == wire.request(0xB232, nonce, request_id=probe_request_id(nonce))


def test_request_id_zero_form_is_still_built_on_request() -> None:
    framed = probe_request_frame(NONCE, request_id=0)
    assert framed == H("0128000000 0801 18b2e402 2220") + NONCE


@pytest.mark.parametrize("size", [0, 31, 33])
def test_probe_request_rejects_wrong_nonce_size(size: int) -> None:
    with pytest.raises(ValueError):
        probe_request_frame(bytes(size))


def test_parse_probe_request_accepts_any_request_id_and_trace_context() -> None:
    frame = wire.request(0xB232, NONCE, request_id=7, traceparent="00-a-b-01", tracestate="k=v")
    assert parse_probe_request(wire.encode(frame)) == NONCE


@pytest.mark.parametrize(
    "body",
    [
        wire.encode(wire.request(wire.PayloadProtocol.ADMIN, NONCE)),  # wrong lane
        wire.encode(wire.event(wire.PayloadProtocol.PROBE, NONCE)),  # wrong kind
        wire.encode(wire.request(wire.PayloadProtocol.PROBE, NONCE[:31])),  # short nonce
        H("ffffff"),  # not a Frame
    ],
    ids=["lane", "kind", "short", "garbage"],
)
def test_parse_probe_request_rejects(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_probe_request(body)


# -- sniffing -----------------------------------------------------------------------


def test_sniff_recognises_every_reference_form() -> None:
    for nonce in (bytes(32), NONCE, b"\xff" * 32):
        framed = probe_request_frame(nonce)
        verdict = sniff_probe_request(framed)
        assert verdict == ProbeRequestSeen(wire.decode_frame(framed[5:]), len(framed))


def test_sniff_recognises_trace_context_and_ignores_what_follows() -> None:
    framed = wire.framed(
        wire.request(0xB232, NONCE, request_id=9, traceparent="00-" + "a" * 52, tracestate="k=v")
    )
    verdict = sniff_probe_request(framed + b"trailing application bytes")
    assert isinstance(verdict, ProbeRequestSeen)
    assert verdict.frame_bytes == len(framed)
    assert (verdict.frame.request_id, verdict.frame.tracestate) == (9, "k=v")


def test_sniff_never_asks_past_the_probe_frame() -> None:
    for framed in (probe_request_frame(bytes(32)), probe_request_frame(b"\xff" * 32)):
        for cut in range(len(framed)):
            verdict = sniff_probe_request(framed[:cut])
            assert isinstance(verdict, NeedMoreBytes), cut
            assert 1 <= verdict.at_most <= len(framed) - cut


@pytest.mark.parametrize(
    "data",
    [
        H("02"),  # another framing byte
        H("01 27"),  # body of 39 bytes: too short for a nonce
        H("01 28 01"),  # body of 256+ bytes
        H("01 28 00 00 01"),
        H("0128000000 0802"),  # envelope_version 2
        H("0128000000 0801 1002"),  # kind EVENT encoded before the protocol
        H("0128000000 0801 18b1"),  # another payload protocol
        H("0128000000 0801 18b2e402 221f"),  # 31-byte payload
    ],
)
def test_sniff_gives_up_at_the_first_diverging_byte(data: bytes) -> None:
    assert sniff_probe_request(data) == NotAProbe()


def test_sniff_rejects_a_lookalike_once_complete() -> None:
    # The first 13 bytes of a probe, the nonce, then a byte no probe carries.
    frame = H("0129000000 0801 18b2e402 2220") + NONCE + H("ff")
    assert isinstance(sniff_probe_request(frame[:-1]), NeedMoreBytes)
    assert sniff_probe_request(frame) == NotAProbe()


def test_sniff_rejects_a_compressed_probe() -> None:
    frame = wire.request(0xB232, NONCE, request_id=3)
    frame.payload_encoding = v1.PayloadEncoding.PAYLOAD_ENCODING_ZSTD
    assert sniff_probe_request(wire.framed(frame)) == NotAProbe()


@given(st.binary(max_size=300))
def test_sniff_agrees_with_an_independent_decoder(data: bytes) -> None:
    verdict = sniff_probe_request(data)
    if isinstance(verdict, ProbeRequestSeen):
        assert is_probe_frame(data)
        assert verdict.frame_bytes == 5 + data[1]
    else:
        assert not is_probe_frame(data)
    if isinstance(verdict, NeedMoreBytes):
        assert verdict.at_most >= 1


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=64))
def test_once_not_a_probe_more_bytes_never_make_it_one(data: bytes, more: bytes) -> None:
    if sniff_probe_request(data) == NotAProbe():
        assert sniff_probe_request(data + more) == NotAProbe()


#: Offsets of a framed probe request whose byte is fixed: the framing byte, the
#: length's upper three bytes and the body prefix (the length's low byte and the
#: nonce vary).
FIXED_OFFSETS = [0, 2, 3, 4, *range(5, 5 + len(PROBE_REQUEST_BODY_PREFIX))]


@given(st.binary(min_size=32, max_size=32), st.sampled_from(FIXED_OFFSETS), st.integers(1, 255))
def test_probe_prefixes_that_diverge_are_not_probes(nonce: bytes, at: int, flip: int) -> None:
    framed = probe_request_frame(nonce)
    changed = framed[:at] + bytes([framed[at] ^ flip]) + framed[at + 1 :]
    assert sniff_probe_request(changed[: at + 1]) == NotAProbe()
    assert sniff_probe_request(changed) == NotAProbe()


# -- replies ------------------------------------------------------------------------


def test_reply_round_trip_echoes_request_metadata() -> None:
    request = wire.request(wire.PayloadProtocol.PROBE, NONCE, request_id=5, tracestate="t")
    framed = probe_reply_frame(request, IDENTITY)
    frame = wire.decode_frame(framed[5:])
    assert wire.FrameKind(frame.kind) is wire.FrameKind.RESPONSE
    assert frame.payload_protocol == 0xB232
    assert (frame.request_id, frame.tracestate) == (5, "t")
    assert frame.payload == NONCE + wire.encode(IDENTITY)
    assert parse_probe_reply(framed[5:], NONCE, request_id=5) == IDENTITY


def test_reply_does_not_echo_the_deadline() -> None:
    request = wire.request(0xB232, NONCE, request_id=5, deadline_unix_ms=123)
    assert wire.decode_frame(probe_reply_frame(request, IDENTITY)[5:]).deadline_unix_ms == 0


def test_reply_golden_bytes() -> None:
    request = wire.decode_frame(probe_request_frame(bytes(32))[5:])
    framed = probe_reply_frame(request, wire.DaemonProcess(pid=7))
    body = H("0801 1001 18b2e402 2222") + bytes(32) + H("0807")
    assert len(body) == 44
    assert framed == H("012c000000") + body


def test_reply_with_another_request_id_is_refused() -> None:
    request = wire.request(wire.PayloadProtocol.PROBE, NONCE, request_id=5)
    body = probe_reply_frame(request, IDENTITY)[5:]
    with pytest.raises(MalformedMessage, match="request_id") as caught:
        parse_probe_reply(body, NONCE, request_id=6)
    assert not isinstance(caught.value, ProbeNonceMismatch)


def test_reply_with_the_reference_legacy_hash_field_still_parses() -> None:
    # The reference appends field 3 (a SHA-256 for pre-BLAKE3 brokers) after the identity.
    request = wire.request(wire.PayloadProtocol.PROBE, NONCE, request_id=5)
    frame = wire.decode_frame(probe_reply_frame(request, IDENTITY)[5:])
    frame.payload = frame.payload + H("1a20") + bytes(32)
    assert parse_probe_reply(wire.encode(frame), NONCE, request_id=5) == IDENTITY


def test_reply_with_another_nonce_is_a_mismatch() -> None:
    request = wire.request(wire.PayloadProtocol.PROBE, NONCE)
    body = probe_reply_frame(request, IDENTITY)[5:]
    with pytest.raises(ProbeNonceMismatch) as caught:
        parse_probe_reply(body, bytes(32))
    assert isinstance(caught.value, MalformedMessage)


@pytest.mark.parametrize(
    "frame",
    [
        wire.event(wire.PayloadProtocol.PROBE, NONCE),  # not a RESPONSE
        wire.response_to(wire.request(0xAD01, b""), NONCE),  # wrong lane
        wire.response_to(wire.request(0xB232, b""), NONCE[:10]),  # shorter than a nonce
        wire.response_to(wire.request(0xB232, b""), NONCE + H("ff")),  # identity garbage
    ],
    ids=["kind", "lane", "short", "identity"],
)
def test_parse_probe_reply_rejects(frame: wire.Frame) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse_probe_reply(wire.encode(frame), NONCE)
    assert not isinstance(caught.value, ProbeNonceMismatch)


def test_reply_to_a_request_without_a_nonce_is_refused() -> None:
    with pytest.raises(MalformedMessage):
        probe_reply_frame(wire.request(0xB232, b"short"), IDENTITY)


def test_nonce_size_constant() -> None:
    assert PROBE_NONCE_BYTES == 32
