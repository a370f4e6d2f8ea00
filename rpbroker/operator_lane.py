"""The operator's requests on rpbroker's lifecycle lane (0xF1C0) of the broker socket.

What this module does: serves the three kinds of operator request the CLI sends
on the lifecycle lane: a broadcast to every backend (one report), a command for
one service (``stop``, ``restart``, ``quiesce``: one ``ServiceCommandReport``),
and a stream (lifecycle events, or one service's backend output): the kept
history as ``StreamRecord`` frames, then with ``follow`` live records until the
operator hangs up or the broker starts stopping, then one ``StreamEnd``. Every
frame answers the request's id.

A follower costs the broker nothing once it leaves: its task ends when its peer
hangs up (the subscription is then dropped), and it never slows the broker: a
follower's records queue in a bounded buffer (the oldest are dropped and counted
in ``dropped_before``), and one that stops reading for ``REPLY_WRITE_TIMEOUT_S``
is disconnected.

What it does not do: own backend state (the registry acts on its backends
through its public methods), render text for people (``admin`` and the CLI do),
or serve the frozen v1 admin verbs (``admin``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

import transports
from rpbroker import admin
from rpbroker.events import EventKind, LifecycleEvent
from rpbroker.policy.hello import is_valid_service_name
from rpbroker.supervisor.output import OutputLine
from rpbroker.wire import (
    BackendOutputLine,
    BroadcastReport,
    Frame,
    LifecycleMessage,
    ServiceCommandReport,
    ServiceCommandRequest,
    StreamEnd,
    StreamRecord,
    StreamRequest,
)
from rpbroker.wire._pb import rpbroker_lifecycle_pb2 as _lc
from rpbroker.wire.codes import (
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
    encode,
    framed,
    response_to,
)
from rpbroker.wire.protocols import PayloadProtocol

if TYPE_CHECKING:
    from rpbroker.broker import Broker

#: Sends one framed reply; False when it could not be written in time (see the broker).
Send = Callable[[bytes], Awaitable[bool]]

_COMMAND_NAMES = {
    ServiceCommand.STOP: "stop",
    ServiceCommand.RESTART: "restart",
    ServiceCommand.QUIESCE: "quiesce",
}


async def serve_lifecycle_frame(
    broker: Broker, frame: Frame, stream: trio.abc.Stream, send: Send
) -> None:
    """Serve one operator request on the lifecycle lane; ignore anything else.

    Invalid frames get no reply (the connection is closed), as on the admin lane.

    Cancellation: a broadcast's outstanding ACK waits are abandoned; a service
    command stops waiting (its stop goes on); a stream just ends.
    """
    if check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.LIFECYCLE):
        return
    try:
        message = decode(LifecycleMessage, frame.payload)
    except MalformedMessage:
        return
    body = message.WhichOneof("body")
    if body == "broadcast_request":
        parsed = admin.operation_from_request(message)
        if parsed is None:
            return
        operation, timeout = parsed
        result = await broker.broadcast(operation, ack_timeout_s=timeout)
        document = admin.envelope("broadcast", **result.to_json())
        reply = LifecycleMessage(
            broadcast_report=BroadcastReport(json=json.dumps(document, sort_keys=True))
        )
        await send(framed(response_to(frame, encode(reply))))
    elif body == "service_command":
        report = await run_service_command(broker, message.service_command)
        await send(
            framed(response_to(frame, encode(LifecycleMessage(service_command_report=report))))
        )
    elif body == "stream_request":
        await serve_stream(broker, frame, message.stream_request, stream, send)


# -- one service -------------------------------------------------------------------------


def _report(outcome: ServiceCommandOutcome, command: str, **body: Any) -> ServiceCommandReport:
    document = admin.envelope(f"service-{command}", **body)
    return ServiceCommandReport(
        outcome=_lc.ServiceCommandOutcome.ValueType(outcome),
        json=json.dumps(document, sort_keys=True),
    )


async def run_service_command(
    broker: Broker, request: ServiceCommandRequest
) -> ServiceCommandReport:
    """Carry out ``stop``, ``restart`` or ``quiesce`` for one service; say what happened.

    An unknown service (no definition and no backend) is ``UNKNOWN_SERVICE`` and
    nothing is done. Stop and restart wait (bounded) until the backends ended.

    Cancellation: stops waiting; a stop already begun goes on.
    """
    name = request.service_name
    try:
        command = ServiceCommand(request.command)
    except ValueError:
        command = ServiceCommand.UNSPECIFIED
    label = _COMMAND_NAMES.get(command, "command")
    if command is ServiceCommand.UNSPECIFIED or not is_valid_service_name(name):
        await trio.lowlevel.checkpoint()
        problem = "unknown command" if command is ServiceCommand.UNSPECIFIED else "bad name"
        return _report(
            ServiceCommandOutcome.BAD_REQUEST,
            label,
            service_name=name,
            detail=f"{problem}: {name!r}; the command is stop, restart or quiesce "
            "and the name a service name",
        )
    definition = await admin.look_up_definition(broker, name)
    backends = broker.backends.of_service(name)
    if definition.state is admin.DefinitionState.NOT_FOUND and not backends:
        return _report(
            ServiceCommandOutcome.UNKNOWN_SERVICE,
            label,
            service_name=name,
            detail=f"unknown service {name!r}: no definition in "
            f"{broker.config.services_dir} and no backend running",
        )
    timeout_s = request.timeout_ms / 1000 if request.timeout_ms else None
    if command is ServiceCommand.QUIESCE:
        result = await broker.backends.quiesce_service(name, ack_timeout_s=timeout_s)
        outcome = (
            ServiceCommandOutcome.DONE
            if result.all_live_backends_acked
            else ServiceCommandOutcome.INCOMPLETE
        )
        return _report(outcome, label, service_name=name, **result.to_json())
    grace_s = broker.config.drain_timeout_s if timeout_s is None else timeout_s
    if command is ServiceCommand.STOP:
        stopped = await broker.backends.stop_service(name, grace_s)
    else:
        stopped = await broker.backends.restart_service(name, grace_s)
    ended = all(row.state != "stopping" for row in stopped)
    return _report(
        ServiceCommandOutcome.DONE if ended else ServiceCommandOutcome.INCOMPLETE,
        label,
        service_name=name,
        backends=[row.to_json() for row in stopped],
        held=broker.backends.is_held(name),
    )


# -- streams ------------------------------------------------------------------------------


def _record_frame(frame: Frame, record: StreamRecord) -> bytes:
    return framed(response_to(frame, encode(LifecycleMessage(stream_record=record))))


def _end_frame(frame: Frame, reason: StreamEndReason, dropped: int = 0, detail: str = "") -> bytes:
    end = StreamEnd(reason=_lc.StreamEndReason.ValueType(reason), dropped=dropped, detail=detail)
    return framed(response_to(frame, encode(LifecycleMessage(stream_end=end))))


def event_record(event: LifecycleEvent) -> StreamRecord:
    dropped = int(event.details.get("dropped", 0)) if event.kind is EventKind.EVENTS_DROPPED else 0
    return StreamRecord(
        event_json=json.dumps(event.to_json(), sort_keys=True), dropped_before=dropped
    )


def line_record(line: OutputLine, dropped_before: int = 0) -> StreamRecord:
    return StreamRecord(
        output_line=BackendOutputLine(
            service_name=line.service_name,
            service_version=line.service_version,
            pid=line.pid,
            stream=line.stream.value,
            text=line.text,
            at_unix_ms=line.at_unix_ms,
            truncated=line.truncated,
        ),
        dropped_before=dropped_before,
    )


async def serve_stream(
    broker: Broker, frame: Frame, request: StreamRequest, stream: trio.abc.Stream, send: Send
) -> None:
    """Send the history, then (with ``follow``) live records, then a ``StreamEnd``.

    Live records stop when the peer hangs up (nothing more is sent), when a
    record cannot be written within the reply bound (``TOO_SLOW``), or when the
    broker starts stopping (``BROKER_STOPPING``; an event stream still carries
    the broker-stopping event).

    Cancellation: the subscription is dropped and nothing more is sent.
    """
    try:
        source = StreamSource(request.source)
    except ValueError:
        source = StreamSource.UNSPECIFIED
    if source is StreamSource.EVENTS:
        await _stream_events(broker, frame, request.follow, stream, send)
    elif source is StreamSource.BACKEND_OUTPUT and is_valid_service_name(request.service_name):
        await _stream_output(broker, frame, request, stream, send)
    else:
        await send(
            _end_frame(
                frame,
                StreamEndReason.BAD_REQUEST,
                detail="unknown stream source or bad service name",
            )
        )


class _LiveEnd(enum.Enum):
    """Why live records stopped."""

    PEER_GONE = "peer-gone"
    BROKER_STOPPING = "broker-stopping"
    TOO_SLOW = "too-slow"


@attrs.define
class _Live:
    """The outcome of a live phase (set by whichever side ends it)."""

    end: _LiveEnd = _LiveEnd.BROKER_STOPPING


async def _watch(
    broker: Broker,
    stream: trio.abc.Stream,
    scope: trio.CancelScope,
    live: _Live,
    *,
    until_stopping: bool,
) -> None:
    """Cancel ``scope`` when the peer hangs up (or, if asked, the broker starts stopping).

    Cancellation: just stops watching.
    """

    async def peer_gone() -> None:
        try:
            closed = await transports.wait_peer_closed(stream)
        except trio.ClosedResourceError:
            closed = True
        if not closed:
            await trio.sleep_forever()  # the operator sent bytes: it is still there
        live.end = _LiveEnd.PEER_GONE
        scope.cancel()

    async def broker_stopping() -> None:
        await broker.wait_stopping()
        live.end = _LiveEnd.BROKER_STOPPING
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_gone)
        if until_stopping:
            nursery.start_soon(broker_stopping)


async def _stream_events(
    broker: Broker, frame: Frame, follow: bool, stream: trio.abc.Stream, send: Send
) -> None:
    # Subscribing and reading the history happen with no checkpoint between:
    # every event is in exactly one of them.
    subscription = broker.iter_events() if follow and not broker.stopping else None
    history = broker.recent_events()
    try:
        for event in history:
            if not await send(_record_frame(frame, event_record(event))):
                return
        if subscription is None:
            reason = StreamEndReason.BROKER_STOPPING if follow else StreamEndReason.HISTORY_SENT
            await send(_end_frame(frame, reason))
            return
        live = _Live()
        async with trio.open_nursery() as nursery:
            # Not cut at the start of a shutdown: the stream carries the
            # broker-stopping event, then ends.
            nursery.start_soon(
                partial(_watch, until_stopping=False), broker, stream, nursery.cancel_scope, live
            )
            async for event in subscription:
                if not await send(_record_frame(frame, event_record(event))):
                    live.end = _LiveEnd.TOO_SLOW
                    break
                if event.kind is EventKind.BROKER_STOPPING:
                    break
            nursery.cancel_scope.cancel()
        if live.end is _LiveEnd.BROKER_STOPPING:
            await send(_end_frame(frame, StreamEndReason.BROKER_STOPPING, subscription.dropped))
    finally:
        if subscription is not None:
            subscription.close()


async def _stream_output(
    broker: Broker, frame: Frame, request: StreamRequest, stream: trio.abc.Stream, send: Send
) -> None:
    name = request.service_name
    output = broker.backends.output
    follower = output.follow(name) if request.follow and not broker.stopping else None
    history = output.lines_of(name)
    try:
        if not history and not broker.backends.of_service(name):
            definition = await admin.look_up_definition(broker, name)
            if definition.state is admin.DefinitionState.NOT_FOUND:
                detail = f"unknown service {name!r}: no definition and no backend output"
                await send(_end_frame(frame, StreamEndReason.UNKNOWN_SERVICE, detail=detail))
                return
        for line in history:
            if not await send(_record_frame(frame, line_record(line))):
                return
        if follower is None:
            reason = (
                StreamEndReason.BROKER_STOPPING if request.follow else StreamEndReason.HISTORY_SENT
            )
            await send(_end_frame(frame, reason))
            return
        live = _Live()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(_watch, until_stopping=True), broker, stream, nursery.cancel_scope, live
            )
            async for line in follower:
                record = line_record(line, follower.take_dropped())
                if not await send(_record_frame(frame, record)):
                    live.end = _LiveEnd.TOO_SLOW
                    break
            nursery.cancel_scope.cancel()
        if live.end is _LiveEnd.BROKER_STOPPING:
            await send(_end_frame(frame, StreamEndReason.BROKER_STOPPING, follower.dropped))
    finally:
        if follower is not None:
            follower.close()
