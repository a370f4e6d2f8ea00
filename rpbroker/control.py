"""Messages on the broker-to-backend control channel, encoded and decoded in one place.

What this module does: builds the framed messages the broker and the backend SDK
exchange over their persistent control channel (readiness, activity, lifecycle
broadcasts and their ACKs, handoff offers and ACKs), builds the handoff-ready EVENT
a backend writes to an adopted client, and parses any inbound control message into
one typed value.

What it does not do: any I/O, or any decision. Handoff offers follow the v1 wire
layout (``0xD0FF``, ``request_id`` = correlation id, explicit ``08 00`` attachment
prefix on Unix); everything else rides rpbroker's private lifecycle lane.
"""

from __future__ import annotations

import attrs

from rpbroker.policy.broadcast import (
    BroadcastFailure,
    BroadcastOperation,
    Quiesce,
    QuiesceReason,
    ReleaseHandles,
)
from rpbroker.wire import (
    BackendActivity,
    BackendReady,
    BroadcastAck,
    BroadcastCommand,
    BroadcastRequest,
    Frame,
    HandoffAck,
    HandoffOffer,
    LifecycleMessage,
)
from rpbroker.wire import Quiesce as QuiesceMessage
from rpbroker.wire import ReleaseHandles as ReleaseHandlesMessage
from rpbroker.wire._pb import rpbroker_lifecycle_pb2 as _lc
from rpbroker.wire._pb.broker_v1_pb2 import FrameKind as _WireFrameKind
from rpbroker.wire.codes import BroadcastAckStatus, FrameKind
from rpbroker.wire.codes import QuiesceReason as WireQuiesceReason
from rpbroker.wire.frames import (
    MalformedMessage,
    check_envelope,
    decode,
    decode_frame,
    encode,
    encode_handoff_offer_with_attachment,
    event,
    framed,
    request,
)
from rpbroker.wire.framing import FRAME_HEADER_BYTES
from rpbroker.wire.protocols import PayloadProtocol

#: Policy quiesce reasons and their wire enum values.
_QUIESCE_WIRE = {
    QuiesceReason.IDLE_TIMEOUT: WireQuiesceReason.IDLE_TIMEOUT,
    QuiesceReason.BROKER_SHUTDOWN: WireQuiesceReason.BROKER_SHUTDOWN,
    QuiesceReason.MAINTENANCE: WireQuiesceReason.MAINTENANCE,
}
_QUIESCE_FROM_WIRE: dict[int, QuiesceReason] = {int(v): k for k, v in _QUIESCE_WIRE.items()}

#: Broadcast failures and their ``BroadcastAckStatus`` wire values (ACKED is success).
_FAILURE_WIRE = {
    BroadcastFailure.UNSUPPORTED_OPERATION: BroadcastAckStatus.UNSUPPORTED_OPERATION,
    BroadcastFailure.REJECTED: BroadcastAckStatus.REJECTED,
    BroadcastFailure.BACKEND_ERROR: BroadcastAckStatus.BACKEND_ERROR,
}
_FAILURE_FROM_WIRE: dict[int, BroadcastFailure] = {int(v): k for k, v in _FAILURE_WIRE.items()}


#: ``HandoffAck.error_detail`` of a backend that refused an offer only because the
#: client's connection failed while the backend confirmed the handoff to it: the
#: broker counts that as the client's doing, not as a failure of the backend.
CLIENT_GONE_DETAIL = "client connection failed while confirming the handoff"


class ControlMessageError(Exception):
    """An inbound control message was malformed or of an unexpected kind."""


# -- inbound values ---------------------------------------------------------------


@attrs.frozen
class ReadyNotice:
    """The backend listens on ``endpoint`` and accepts handoffs."""

    endpoint: str
    pid: int


@attrs.frozen
class ActivityNotice:
    """The backend's connection counts changed."""

    open_connections: int
    completed_connections: int


@attrs.frozen
class BroadcastReply:
    """A backend's answer to a broadcast command. ``failure`` is None for an ACK."""

    operation_id: int
    failure: BroadcastFailure | None
    detail: str


@attrs.frozen
class HandoffReply:
    """A backend's HandoffAck (frame RESPONSE on ``0xD0FF``)."""

    correlation_id: int
    frame_request_id: int
    token: bytes
    accepted: bool
    detail: str


@attrs.frozen
class OfferNotice:
    """A HandoffOffer as the backend receives it."""

    frame: Frame
    offer: HandoffOffer


@attrs.frozen
class BroadcastNotice:
    """A broadcast command as the backend receives it."""

    operation_id: int
    operation: BroadcastOperation
    drain_deadline_ms: int
    ack_timeout_ms: int


Inbound = (
    ReadyNotice | ActivityNotice | BroadcastReply | HandoffReply | OfferNotice | BroadcastNotice
)


# -- builders ---------------------------------------------------------------------


def _lifecycle(kind: FrameKind, message: LifecycleMessage, request_id: int = 0) -> bytes:
    payload = encode(message)
    if kind is FrameKind.EVENT:
        frame = event(PayloadProtocol.LIFECYCLE, payload, request_id=request_id)
    else:
        frame = request(PayloadProtocol.LIFECYCLE, payload, request_id=request_id)
        frame.kind = _WireFrameKind.ValueType(kind)
    return framed(frame)


def ready_message(endpoint: str, pid: int, service_name: str, service_version: str) -> bytes:
    msg = LifecycleMessage(
        ready=BackendReady(
            backend_pipe=endpoint,
            pid=pid,
            service_name=service_name,
            service_version=service_version,
        )
    )
    return _lifecycle(FrameKind.EVENT, msg)


def activity_message(open_connections: int, completed_connections: int) -> bytes:
    msg = LifecycleMessage(
        activity=BackendActivity(
            open_connections=open_connections, completed_connections=completed_connections
        )
    )
    return _lifecycle(FrameKind.EVENT, msg)


def put_operation(
    target: BroadcastCommand | BroadcastRequest, operation: BroadcastOperation
) -> None:
    """Fill the ``operation`` oneof of a broadcast command or request."""
    if isinstance(operation, ReleaseHandles):
        target.release_handles.CopyFrom(ReleaseHandlesMessage(path_prefix=operation.path_prefix))
    else:
        target.quiesce.CopyFrom(
            QuiesceMessage(reason=_lc.QuiesceReason.ValueType(_QUIESCE_WIRE[operation.reason]))
        )


def get_operation(source: BroadcastCommand | BroadcastRequest) -> BroadcastOperation | None:
    """Read the ``operation`` oneof of a broadcast command or request (``None`` if unset)."""
    which = source.WhichOneof("operation")
    if which == "release_handles":
        return ReleaseHandles(path_prefix=source.release_handles.path_prefix)
    if which == "quiesce":
        return Quiesce(
            reason=_QUIESCE_FROM_WIRE.get(int(source.quiesce.reason), QuiesceReason.MAINTENANCE)
        )
    return None


def broadcast_command(
    operation_id: int,
    operation: BroadcastOperation,
    drain_deadline_ms: int = 0,
    ack_timeout_ms: int = 0,
) -> bytes:
    """The framed command for one broadcast (``drain_deadline_ms``: relative, 0 unset)."""
    command = BroadcastCommand(
        operation_id=operation_id,
        drain_deadline_ms=drain_deadline_ms,
        ack_timeout_ms=ack_timeout_ms,
    )
    put_operation(command, operation)
    return _lifecycle(FrameKind.REQUEST, LifecycleMessage(broadcast=command), operation_id)


def broadcast_reply(operation_id: int, failure: BroadcastFailure | None, detail: str = "") -> bytes:
    status = BroadcastAckStatus.ACKED if failure is None else _FAILURE_WIRE[failure]
    ack = BroadcastAck(
        operation_id=operation_id, status=_lc.BroadcastAckStatus.ValueType(status), detail=detail
    )
    return _lifecycle(FrameKind.RESPONSE, LifecycleMessage(broadcast_ack=ack), operation_id)


def handoff_offer(
    *,
    token: bytes,
    service_name: str,
    correlation_id: int,
    deadline_unix_ms: int,
    handle_value: int = 0,
) -> bytes:
    """The framed HandoffOffer (REQUEST, ``0xD0FF``, request_id = correlation id)."""
    offer = HandoffOffer(
        handle_value=handle_value,
        token=token,
        service_name=service_name,
        correlation_id=correlation_id,
    )
    frame = request(
        PayloadProtocol.HANDOFF,
        encode_handoff_offer_with_attachment(offer),
        request_id=correlation_id,
        deadline_unix_ms=deadline_unix_ms,
    )
    return framed(frame)


def handoff_reply(*, token: bytes, accepted: bool, detail: str, correlation_id: int) -> bytes:
    """The backend's framed HandoffAck to the broker (RESPONSE, ``0xD0FF``)."""
    ack = HandoffAck(
        token=token, accepted=accepted, error_detail=detail, correlation_id=correlation_id
    )
    frame = request(PayloadProtocol.HANDOFF, encode(ack), request_id=correlation_id)
    frame.kind = _WireFrameKind.ValueType(FrameKind.RESPONSE)
    return framed(frame)


def handoff_ready_event(*, token: bytes, accepted: bool, detail: str, correlation_id: int) -> bytes:
    """The handoff-ready notice written on the client's original connection (SPEC §3)."""
    ack = HandoffAck(
        token=token, accepted=accepted, error_detail=detail, correlation_id=correlation_id
    )
    return framed(event(PayloadProtocol.HANDOFF, encode(ack), request_id=correlation_id))


# -- parsing ----------------------------------------------------------------------


def parse(framed_message: bytes) -> Inbound:
    """Decode one framed control message into a typed value.

    Raises ``ControlMessageError`` for anything malformed or not expected on a
    control channel.
    """
    try:
        frame = decode_frame(framed_message[FRAME_HEADER_BYTES:])
    except MalformedMessage as exc:
        raise ControlMessageError(f"undecodable control frame: {exc}") from exc
    protocol = frame.payload_protocol
    try:
        if protocol == PayloadProtocol.HANDOFF:
            return _parse_handoff(frame)
        if protocol == PayloadProtocol.LIFECYCLE:
            return _parse_lifecycle(frame)
    except MalformedMessage as exc:
        raise ControlMessageError(f"undecodable control payload: {exc}") from exc
    raise ControlMessageError(f"unexpected payload protocol 0x{protocol:04X} on control channel")


def _parse_handoff(frame: Frame) -> Inbound:
    if (
        check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.HANDOFF)
        is None
    ):
        return OfferNotice(frame=frame, offer=decode(HandoffOffer, frame.payload))
    fault = check_envelope(frame, kind=FrameKind.RESPONSE, payload_protocol=PayloadProtocol.HANDOFF)
    if fault is not None:
        raise ControlMessageError(f"handoff frame rejected: {fault.name}")
    ack = decode(HandoffAck, frame.payload)
    return HandoffReply(
        correlation_id=ack.correlation_id,
        frame_request_id=frame.request_id,
        token=bytes(ack.token),
        accepted=ack.accepted,
        detail=ack.error_detail,
    )


def _parse_lifecycle(frame: Frame) -> Inbound:
    msg = decode(LifecycleMessage, frame.payload)
    which = msg.WhichOneof("body")
    if which == "ready":
        return ReadyNotice(endpoint=msg.ready.backend_pipe, pid=msg.ready.pid)
    if which == "activity":
        return ActivityNotice(
            open_connections=msg.activity.open_connections,
            completed_connections=msg.activity.completed_connections,
        )
    if which == "broadcast_ack":
        ack = msg.broadcast_ack
        status = int(ack.status)
        failure = None if status == BroadcastAckStatus.ACKED else _failure_of(status)
        return BroadcastReply(operation_id=ack.operation_id, failure=failure, detail=ack.detail)
    if which == "broadcast":
        cmd = msg.broadcast
        operation = get_operation(cmd)
        if operation is None:
            raise ControlMessageError("broadcast command without an operation")
        return BroadcastNotice(
            operation_id=cmd.operation_id,
            operation=operation,
            drain_deadline_ms=cmd.drain_deadline_ms,
            ack_timeout_ms=cmd.ack_timeout_ms,
        )
    raise ControlMessageError(f"unexpected lifecycle message {which!r} on control channel")


def _failure_of(status: int) -> BroadcastFailure:
    return _FAILURE_FROM_WIRE.get(status, BroadcastFailure.BACKEND_ERROR)
