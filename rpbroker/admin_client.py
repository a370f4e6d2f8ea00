"""Client side of the admin lane and of operator broadcast requests.

What this module does: sends one ``AdminRequest`` (``0xAD01``) or one lifecycle
broadcast request to a broker socket and returns the decoded reply.

What it does not do: format output for humans (the CLI does) or retry.
"""

from __future__ import annotations

import json
from typing import Any

import trio

import transports
from rpbroker import control
from rpbroker.errors import BrokerProtocolError, BrokerUnavailableError, ConnectTimeoutError
from rpbroker.policy.broadcast import BroadcastOperation
from rpbroker.wire import AdminReply, AdminRequest, BroadcastRequest, LifecycleMessage
from rpbroker.wire._pb.broker_v1_pb2 import AdminVerb as _WireVerb
from rpbroker.wire.codes import AdminVerb, FrameKind
from rpbroker.wire.frames import (
    MalformedMessage,
    check_envelope,
    decode,
    decode_frame,
    encode,
    framed,
    request,
)
from rpbroker.wire.framing import MAX_FRAME_BYTES, FramingError, read_frame_body
from rpbroker.wire.protocols import PayloadProtocol

#: Admin round-trip bound, seconds (facts §4: the 30 s client deadline).
DEFAULT_ADMIN_TIMEOUT_S = 30.0


async def _round_trip(
    socket_path: str, protocol: PayloadProtocol, payload: bytes, timeout_s: float
) -> bytes:
    try:
        with trio.fail_after(timeout_s):
            try:
                stream = await transports.connect(socket_path)
            except transports.TransportError as exc:
                raise BrokerUnavailableError(f"no broker at {socket_path}: {exc}") from exc
            async with stream:
                await stream.send_all(framed(request(protocol, payload, request_id=1)))
                try:
                    body = await read_frame_body(stream, MAX_FRAME_BYTES)
                except (FramingError, trio.BrokenResourceError, OSError) as exc:
                    raise BrokerProtocolError(f"broker sent no valid reply: {exc}") from exc
    except trio.TooSlowError as exc:
        raise ConnectTimeoutError(
            f"broker at {socket_path} did not answer within {timeout_s:g} s"
        ) from exc
    try:
        frame = decode_frame(body)
    except MalformedMessage as exc:
        raise BrokerProtocolError(f"undecodable reply: {exc}") from exc
    fault = check_envelope(frame, kind=FrameKind.RESPONSE, payload_protocol=protocol)
    if fault is not None:
        raise BrokerProtocolError(f"unexpected reply frame: {fault.name.lower()} mismatch")
    return bytes(frame.payload)


async def admin_request(
    socket_path: str,
    verb: AdminVerb,
    *,
    json_output: bool = False,
    service_name: str = "",
    drain_deadline_ms: int = 0,
    timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S,
) -> AdminReply:
    """Send one admin verb and return the broker's ``AdminReply``.

    Cancellation: closes the connection; the broker sees a disconnect.
    """
    req = AdminRequest(
        verb=_WireVerb.ValueType(verb),
        json=json_output,
        service_name=service_name,
        drain_deadline_ms=drain_deadline_ms,
    )
    payload = await _round_trip(socket_path, PayloadProtocol.ADMIN, encode(req), timeout_s)
    try:
        return decode(AdminReply, payload)
    except MalformedMessage as exc:
        raise BrokerProtocolError(f"undecodable AdminReply: {exc}") from exc


async def broadcast_request(
    socket_path: str,
    operation: BroadcastOperation,
    *,
    ack_timeout_s: float | None = None,
    timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S,
) -> dict[str, Any]:
    """Ask the broker to broadcast ``operation``; return the JSON result document.

    Cancellation: closes the connection; the broker's fan-out continues to its
    own ACK timeouts.
    """
    req = BroadcastRequest(ack_timeout_ms=int(ack_timeout_s * 1000) if ack_timeout_s else 0)
    control.put_operation(req, operation)
    payload = await _round_trip(
        socket_path,
        PayloadProtocol.LIFECYCLE,
        encode(LifecycleMessage(broadcast_request=req)),
        timeout_s,
    )
    try:
        reply = decode(LifecycleMessage, payload)
    except MalformedMessage as exc:
        raise BrokerProtocolError(f"undecodable broadcast report: {exc}") from exc
    if reply.WhichOneof("body") != "broadcast_report":
        raise BrokerProtocolError("broker answered the broadcast request with something else")
    document: dict[str, Any] = json.loads(reply.broadcast_report.json)
    return document
