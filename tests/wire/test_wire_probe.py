"""The endpoint identity probe (0xB232): fixed request prefix, nonce echo, identity."""

from __future__ import annotations

import pytest

from rpbroker import wire
from rpbroker.wire import (
    PROBE_NONCE_BYTES,
    PROBE_REQUEST_PREFIX,
    MalformedMessage,
    ProbeNonceMismatch,
    parse_probe_reply,
    parse_probe_request,
    probe_reply_frame,
    probe_request_frame,
)

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


def test_prefix_is_the_hand_derived_13_bytes() -> None:
    # header (40-byte body) | envelope_version 1 | protocol 0xB232 | payload tag, len 32
    assert H("0128000000 0801 18b2e402 2220") == PROBE_REQUEST_PREFIX
    assert len(PROBE_REQUEST_PREFIX) == 13


@pytest.mark.parametrize("nonce", [bytes(32), NONCE, b"\xff" * 32])
def test_every_probe_request_starts_with_the_prefix(nonce: bytes) -> None:
    framed = probe_request_frame(nonce)
    assert framed[:13] == PROBE_REQUEST_PREFIX
    assert framed[13:] == nonce
    assert len(framed) == 5 + 40


def test_probe_request_is_a_plain_request_frame() -> None:
    frame = wire.decode_frame(probe_request_frame(NONCE)[5:])
    assert frame == wire.request(wire.PayloadProtocol.PROBE, NONCE)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_probe_request_rejects_wrong_nonce_size(size: int) -> None:
    with pytest.raises(ValueError):
        probe_request_frame(bytes(size))


def test_parse_probe_request_round_trip() -> None:
    assert parse_probe_request(probe_request_frame(NONCE)[5:]) == NONCE


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


def test_reply_round_trip_echoes_request_metadata() -> None:
    request = wire.request(wire.PayloadProtocol.PROBE, NONCE, request_id=5, tracestate="t")
    framed = probe_reply_frame(request, IDENTITY)
    frame = wire.decode_frame(framed[5:])
    assert wire.FrameKind(frame.kind) is wire.FrameKind.RESPONSE
    assert frame.payload_protocol == 0xB232
    assert (frame.request_id, frame.tracestate) == (5, "t")
    assert frame.payload == NONCE + wire.encode(IDENTITY)
    assert parse_probe_reply(framed[5:], NONCE) == IDENTITY


def test_reply_golden_bytes() -> None:
    request = wire.decode_frame(probe_request_frame(bytes(32))[5:])
    framed = probe_reply_frame(request, wire.DaemonProcess(pid=7))
    body = H("0801 1001 18b2e402 2222") + bytes(32) + H("0807")
    assert len(body) == 44
    assert framed == H("012c000000") + body


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
