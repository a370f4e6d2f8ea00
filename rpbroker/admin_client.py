"""Client side of the admin lane and of operator broadcast requests.

What this module does: sends one ``AdminRequest`` (``0xAD01``), or one operator
request on rpbroker's lifecycle lane (a broadcast, a command for one service, a
stream of events or of a service's backend output), to a broker socket and
returns the decoded reply; a stream's records are handed to a callback as they
arrive, and the call returns how the stream ended.

What it does not do: format output for humans (the CLI does) or retry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.errors import BrokerProtocolError, BrokerUnavailableError, ConnectTimeoutError
from rpbroker.policy.broadcast import BroadcastOperation
from rpbroker.wire import (
    AdminReply,
    AdminRequest,
    BroadcastRequest,
    LifecycleMessage,
    ServiceCommandRequest,
    StreamRecord,
    StreamRequest,
)
from rpbroker.wire._pb import rpbroker_lifecycle_pb2 as _lc
from rpbroker.wire._pb.broker_v1_pb2 import AdminVerb as _WireVerb
from rpbroker.wire.codes import (
    AdminVerb,
    FrameKind,
    ServiceCommand,
    ServiceCommandOutcome,
    StreamEndReason,
    StreamSource,
)
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
#: Slack on a stop/restart round trip beyond the stop's own grace, seconds: the
#: broker's reap bound (5 s) and the wait for the exit to be processed.
SERVICE_STOP_SLACK_S = 10.0


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


@attrs.frozen
class ServiceCommandResult:
    """The broker's answer to a service command: a typed outcome and its JSON document."""

    outcome: ServiceCommandOutcome
    document: dict[str, Any]


async def service_command(
    socket_path: str,
    command: ServiceCommand,
    service_name: str,
    *,
    command_timeout_s: float | None = None,
    timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S,
) -> ServiceCommandResult:
    """Ask the broker to stop, restart or quiesce every backend of ``service_name``.

    ``command_timeout_s``: for stop/restart the grace between SIGTERM and SIGKILL,
    for quiesce the ACK wait (``None``: the broker's own). ``timeout_s`` bounds
    the round trip (stop/restart: at least the grace plus ``SERVICE_STOP_SLACK_S``).

    Cancellation: closes the connection; a stop the broker began goes on.
    """
    req = ServiceCommandRequest(
        service_name=service_name,
        command=_lc.ServiceCommand.ValueType(command),
        timeout_ms=int(command_timeout_s * 1000) if command_timeout_s else 0,
    )
    if command is not ServiceCommand.QUIESCE and command_timeout_s is not None:
        timeout_s = max(timeout_s, command_timeout_s + SERVICE_STOP_SLACK_S)
    payload = await _round_trip(
        socket_path,
        PayloadProtocol.LIFECYCLE,
        encode(LifecycleMessage(service_command=req)),
        timeout_s,
    )
    try:
        reply = decode(LifecycleMessage, payload)
    except MalformedMessage as exc:
        raise BrokerProtocolError(f"undecodable service command report: {exc}") from exc
    if reply.WhichOneof("body") != "service_command_report":
        raise BrokerProtocolError("broker answered the service command with something else")
    report = reply.service_command_report
    try:
        outcome = ServiceCommandOutcome(report.outcome)
    except ValueError:
        outcome = ServiceCommandOutcome.UNSPECIFIED
    document: dict[str, Any] = json.loads(report.json) if report.json else {}
    return ServiceCommandResult(outcome=outcome, document=document)


@attrs.frozen
class StreamSummary:
    """How a stream ended."""

    #: ``None``: the broker closed the connection without an end record.
    reason: StreamEndReason | None
    #: Records the broker dropped because this reader fell behind, in all.
    dropped: int = 0
    detail: str = ""


async def read_stream(
    socket_path: str,
    source: StreamSource,
    on_record: Callable[[StreamRecord], None],
    *,
    service_name: str = "",
    follow: bool = False,
    timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S,
) -> StreamSummary:
    """Stream ``source`` (events, or ``service_name``'s backend output) into ``on_record``.

    The broker sends what it kept, then with ``follow`` live records until it
    stops (or this call is cancelled), then an end record. ``timeout_s`` bounds
    connecting and, without ``follow``, the whole stream.

    Raises ``BrokerUnavailableError`` (no broker), ``ConnectTimeoutError`` and
    ``BrokerProtocolError`` (a frame that is not a stream record).

    Cancellation: closes the connection; the broker drops the subscription.
    """
    wanted = StreamRequest(
        source=_lc.StreamSource.ValueType(source), service_name=service_name, follow=follow
    )
    payload = encode(LifecycleMessage(stream_request=wanted))
    data = framed(request(PayloadProtocol.LIFECYCLE, payload, request_id=1))
    try:
        with trio.fail_after(timeout_s):
            try:
                stream = await transports.connect(socket_path)
            except transports.TransportError as exc:
                raise BrokerUnavailableError(f"no broker at {socket_path}: {exc}") from exc
    except trio.TooSlowError as exc:
        raise ConnectTimeoutError(
            f"broker at {socket_path} did not answer within {timeout_s:g} s"
        ) from exc
    async with stream:
        try:
            with trio.fail_after(math.inf if follow else timeout_s):
                await stream.send_all(data)
                return await _read_records(stream, on_record)
        except trio.TooSlowError as exc:
            raise ConnectTimeoutError(
                f"broker at {socket_path} did not finish the stream within {timeout_s:g} s"
            ) from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise BrokerProtocolError(f"the stream broke: {exc}") from exc


async def _read_records(
    stream: trio.abc.Stream, on_record: Callable[[StreamRecord], None]
) -> StreamSummary:
    while True:
        try:
            body = await read_frame_body(stream, MAX_FRAME_BYTES)
        except FramingError:
            return StreamSummary(reason=None)  # closed without an end record
        try:
            frame = decode_frame(body)
            fault = check_envelope(
                frame, kind=FrameKind.RESPONSE, payload_protocol=PayloadProtocol.LIFECYCLE
            )
            if fault is not None:
                raise MalformedMessage("Frame", f"{fault.name.lower()} mismatch")
            message = decode(LifecycleMessage, frame.payload)
        except MalformedMessage as exc:
            raise BrokerProtocolError(f"undecodable stream frame: {exc}") from exc
        body_kind = message.WhichOneof("body")
        if body_kind == "stream_record":
            on_record(message.stream_record)
        elif body_kind == "stream_end":
            end = message.stream_end
            try:
                reason: StreamEndReason | None = StreamEndReason(end.reason)
            except ValueError:
                reason = StreamEndReason.UNSPECIFIED
            return StreamSummary(reason=reason, dropped=end.dropped, detail=end.detail)
        else:
            raise BrokerProtocolError(f"unexpected {body_kind} in a stream")
