"""Wire format of the endpoint identity probe (payload protocol 0xB232).

What this module does: builds and parses the two frames of a probe. The prober
sends a REQUEST whose payload is a fresh 32-byte nonce; the backend answers with
a RESPONSE whose payload is that nonce followed by the encoded ``DaemonProcess``
describing itself. Parsing checks the envelope, the nonce length and the echo.

What it does not do: generate nonces, perform I/O or time out (v1 uses 500 ms),
or compare the returned identity with the expected one (pid, exe hash, boot id
...): that is the launcher's decision.
"""

from __future__ import annotations

from typing import Final

from rpbroker.wire._pb import broker_v1_pb2 as _v1
from rpbroker.wire.codes import FrameKind
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
from rpbroker.wire.protocols import PayloadProtocol

#: Nonce length (bytes): 256 random bits, so a stale or foreign endpoint cannot echo
#: a nonce it has not just been sent.
PROBE_NONCE_BYTES: Final = 32

#: The first 13 bytes of every framed probe request: the 5-byte header (body length
#: 40) and the body up to the nonce (envelope_version 1, protocol 0xB232, payload
#: tag and length 32). Kind REQUEST and request_id 0 are defaults, so not encoded.
PROBE_REQUEST_PREFIX: Final = bytes.fromhex("0128000000" + "0801" + "18b2e402" + "2220")


class ProbeNonceMismatch(MalformedMessage):
    """A probe reply that does not begin with the nonce that was sent."""


def _check_nonce(nonce: bytes, message_name: str) -> None:
    if len(nonce) != PROBE_NONCE_BYTES:
        raise MalformedMessage(
            message_name, f"probe nonce is {len(nonce)} bytes, expected {PROBE_NONCE_BYTES}"
        )


def probe_request_frame(nonce: bytes) -> bytes:
    """The framed probe REQUEST (request_id 0) carrying ``nonce`` (32 bytes, else ValueError)."""
    if len(nonce) != PROBE_NONCE_BYTES:
        raise ValueError(f"probe nonce must be {PROBE_NONCE_BYTES} bytes, got {len(nonce)}")
    return framed(request(PayloadProtocol.PROBE, nonce))


def parse_probe_request(body: bytes) -> bytes:
    """The nonce of a probe request body; ``MalformedMessage`` if it is not one."""
    frame = decode_frame(body)
    fault = check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.PROBE)
    if fault is not None:
        raise MalformedMessage(
            "probe request", fault.describe(FrameKind.REQUEST, PayloadProtocol.PROBE)
        )
    _check_nonce(frame.payload, "probe request")
    return frame.payload


def probe_reply_frame(request: _v1.Frame, identity: _v1.DaemonProcess) -> bytes:
    """The framed RESPONSE to ``request``: its nonce, then the encoded ``identity``.

    ``request`` must carry a 32-byte nonce (``MalformedMessage`` otherwise); its
    request_id and trace context are echoed.
    """
    _check_nonce(request.payload, "probe request")
    return framed(response_to(request, request.payload + encode(identity)))


def parse_probe_reply(body: bytes, nonce: bytes) -> _v1.DaemonProcess:
    """The ``DaemonProcess`` in a probe reply body, after checking it echoes ``nonce``.

    Raises ``MalformedMessage`` for a bad envelope or identity, and its subclass
    ``ProbeNonceMismatch`` when the echoed nonce differs.
    """
    frame = decode_frame(body)
    fault = check_envelope(frame, kind=FrameKind.RESPONSE, payload_protocol=PayloadProtocol.PROBE)
    if fault is not None:
        raise MalformedMessage(
            "probe reply", fault.describe(FrameKind.RESPONSE, PayloadProtocol.PROBE)
        )
    payload = frame.payload
    if len(payload) < PROBE_NONCE_BYTES:
        raise MalformedMessage(
            "probe reply", f"payload is {len(payload)} bytes, shorter than the nonce"
        )
    if payload[:PROBE_NONCE_BYTES] != nonce:
        raise ProbeNonceMismatch("probe reply", "the echoed nonce is not the one sent")
    return decode(_v1.DaemonProcess, payload[PROBE_NONCE_BYTES:])
