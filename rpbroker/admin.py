"""Admin verbs (``0xAD01``) and operator broadcast requests on the broker socket.

What this module does: validates an admin frame, renders the reply of each verb
of SPEC §8 / facts §8 (STATUS as JSON or text, DUMP, LIST_INSTANCES, HEALTHZ,
READYZ, BACKEND_HEALTH, CONFIG, DIAGNOSE, METRICS, SHUTDOWN; anything else is
"unsupported admin verb" with exit 2), every JSON body in the common envelope
(``schema_version: 1``, ``command``, ``generated_at_unix_ms``). It also serves
rpbroker's lifecycle-lane broadcast requests from the CLI.

What it does not do: own any state. It reads the broker it is given and calls its
public methods (``request_shutdown``, ``broadcast``).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import trio

import transports
from rpbroker import control
from rpbroker.policy.broadcast import BroadcastOperation
from rpbroker.wire import AdminReply, AdminRequest, BroadcastReport, Frame, LifecycleMessage
from rpbroker.wire._pb.broker_v1_pb2 import AdminReplyKind as _WireReplyKind
from rpbroker.wire.codes import AdminReplyKind, AdminVerb, FrameKind
from rpbroker.wire.frames import (
    MalformedMessage,
    check_envelope,
    decode,
    encode,
    framed,
    response_to,
)
from rpbroker.wire.framing import MAX_FRAME_BYTES, MAX_HELLO_BYTES
from rpbroker.wire.protocols import PayloadProtocol

if TYPE_CHECKING:
    from rpbroker.broker import Broker

ADMIN_SCHEMA_VERSION = 1

_JSON = "application/json"
_TEXT = "text/plain"
_OPENMETRICS = "application/openmetrics-text"

#: Verb names as they appear in ``command`` (and on the CLI).
VERB_COMMANDS = {
    AdminVerb.STATUS: "status",
    AdminVerb.DUMP: "dump",
    AdminVerb.LIST_INSTANCES: "list-instances",
    AdminVerb.HEALTHZ: "healthz",
    AdminVerb.READYZ: "readyz",
    AdminVerb.BACKEND_HEALTH: "backend-health",
    AdminVerb.CONFIG: "config",
    AdminVerb.DIAGNOSE: "diagnose",
    AdminVerb.METRICS: "metrics",
    AdminVerb.SHUTDOWN: "shutdown",
}

_DIAGNOSE_ENTRIES = (
    ("admin/status.json", "json", "status", True, False),
    ("admin/dump.json", "json", "dump", True, True),
    ("config/effective.json", "json", "effective-config", True, False),
    ("metrics/openmetrics.txt", "openmetrics", "metrics", True, False),
    ("events/lifecycle.jsonl", "jsonl", "lifecycle-events", False, True),
    ("manifest/backend-manifests.json", "json", "backend-manifest-index", False, True),
    ("process/backends.json", "json", "backend-table", True, True),
    ("system/summary.json", "json", "host-summary", False, True),
)
_REDACTIONS = ["home", "secret-env", "acl-identities"]


def _envelope(command: str, **body: Any) -> dict[str, Any]:
    return {
        "schema_version": ADMIN_SCHEMA_VERSION,
        "command": command,
        "generated_at_unix_ms": int(time.time() * 1000),
        **body,
    }


def _backend_rows(broker: Broker) -> list[dict[str, Any]]:
    return [handle.to_json() for handle in broker.backends]


def status_document(broker: Broker) -> dict[str, Any]:
    return _envelope(
        "status",
        broker_instance=broker.config.instance_name,
        broker_pid=os.getpid(),
        broker_socket=broker.socket_path,
        uptime_seconds=round(time.time() - broker.started_at, 3),
        accepting_hello=broker.accepting,
        connections_open=broker.connections_open,
        fd_pressure={
            "demoted": broker.fd_guard.demoted,
            "episodes": broker.fd_guard.episodes,
            "refusals": broker.fd_guard.refusals,
        },
        inode_pressure={"supported": False, "detail": "inode accounting is not measured"},
        pending_handoffs=len(broker.handoff.acks),
        backends=_backend_rows(broker),
    )


def _config_values(broker: Broker) -> dict[str, Any]:
    cfg = broker.config

    def leaf(value: Any, source: str) -> dict[str, Any]:
        return {"value": value, "source": source}

    return {
        "broker": {
            "broker_instance": leaf(cfg.instance_name, "runtime"),
            "broker_pid": leaf(os.getpid(), "runtime"),
            "accepting_hello": leaf(broker.accepting, "runtime"),
            "socket_path": leaf(broker.socket_path, "config"),
        },
        "protocol": {
            "admin_payload_protocol": leaf("0xAD01", "protocol-v1"),
            "envelope_version": leaf(1, "protocol-v1"),
            "framing_version": leaf(1, "protocol-v1"),
        },
        "limits": {
            "max_frame_bytes": leaf(MAX_FRAME_BYTES, "protocol-v1"),
            "max_hello_bytes": leaf(MAX_HELLO_BYTES, "protocol-v1"),
            "connections_open": leaf(broker.connections_open, "runtime"),
            "hello_timeout_ms": leaf(int(cfg.hello_timeout_s * 1000), "config"),
            "hello_rate_limit": leaf(cfg.hello_rate_limit, "config"),
        },
        "paths": {"service_definition_dir": leaf(str(cfg.services_dir), "config")},
        "spawn_budget": {
            "default_attempts_per_window": leaf(cfg.spawn_attempts_per_window, "config"),
            "default_window_ms": leaf(int(cfg.spawn_window_s * 1000), "config"),
            "active_budget_rows": leaf(
                len(broker.backends.spawn_budget_rows(trio.current_time())), "runtime"
            ),
        },
        "handoff": {
            "enabled": leaf(cfg.handoff_enabled, "config"),
            "ack_deadline_ms": leaf(int(cfg.ack_deadline_s * 1000), "config"),
            "adopt_window_ms": leaf(int(cfg.handoff_adopt_window_s * 1000), "config"),
        },
        "diagnostics": {
            "bundle_format": leaf("tar.gz", "schema-v1"),
            "bundle_mode": leaf("metadata-only", "schema-v1"),
            "redactions": leaf(_REDACTIONS, "schema-v1"),
        },
    }


def metrics_text(broker: Broker) -> str:
    active: dict[str, int] = {}
    for handle in broker.backends:
        active[handle.key.service_name] = active.get(handle.key.service_name, 0) + 1
    budget = {
        (str(row["service_name"]), str(row["service_version"])): int(str(row["remaining"]))
        for row in broker.backends.spawn_budget_rows(trio.current_time())
    }
    return broker.metrics.render(
        active_backends=active,
        budget_remaining=budget,
        connections_open=broker.connections_open,
        fd_usage_ratio=transports.fd_usage_ratio() or 0.0,
        uptime_seconds=time.time() - broker.started_at,
    )


def render(broker: Broker, request: AdminRequest) -> AdminReply:
    """The reply to one admin request. Side effects: SHUTDOWN requests a shutdown."""
    try:
        verb = AdminVerb(request.verb)
    except ValueError:
        verb = AdminVerb.UNSPECIFIED

    def as_json(body: dict[str, Any]) -> AdminReply:
        return AdminReply(
            kind=_WireReplyKind.ValueType(AdminReplyKind.JSON),
            body=json.dumps(body, sort_keys=True),
            content_type=_JSON,
        )

    def as_text(body: str, exit_code: int = 0) -> AdminReply:
        return AdminReply(
            kind=_WireReplyKind.ValueType(AdminReplyKind.TEXT),
            body=body,
            exit_code=exit_code,
            content_type=_TEXT,
        )

    if verb is AdminVerb.STATUS:
        if request.json:
            return as_json(status_document(broker))
        return as_text(
            f"broker_instance: {broker.config.instance_name}\n"
            f"accepting_hello: {str(broker.accepting).lower()}\n"
        )
    if verb is AdminVerb.DUMP:
        return as_json(
            _envelope(
                "dump",
                broker_instance=broker.config.instance_name,
                effective_config=_config_values(broker),
                backend_table=_backend_rows(broker),
                spawn_budgets=broker.backends.spawn_budget_rows(trio.current_time()),
                recent_lifecycle_events=[e.to_json() for e in broker.recent_events()],
            )
        )
    if verb is AdminVerb.LIST_INSTANCES:
        return as_json(
            _envelope(
                "list-instances",
                instances=[
                    {
                        "broker_instance": broker.config.instance_name,
                        "pipe": broker.socket_path,
                        "pid": os.getpid(),
                        "state": "running" if broker.accepting else "not-serving",
                    }
                ],
            )
        )
    if verb is AdminVerb.HEALTHZ:
        return as_text("ok\n")
    if verb is AdminVerb.READYZ:
        return as_text("ready\n") if broker.accepting else as_text("not ready\n", 1)
    if verb is AdminVerb.BACKEND_HEALTH:
        service = request.service_name or "unknown"
        rows = [
            {
                "service_version": h.key.service_version,
                "pid": h.pid,
                "state": h.status,
                "last_hello_unix_ms": h.last_active_unix_ms,
                "last_error": h.spawn_failure_detail or None,
            }
            for h in broker.backends
            if h.key.service_name == service
        ]
        return as_json(_envelope("backend-health", service_name=service, backends=rows))
    if verb is AdminVerb.CONFIG:
        return as_json(_envelope("config", values=_config_values(broker)))
    if verb is AdminVerb.DIAGNOSE:
        backends = _backend_rows(broker)
        entries: list[dict[str, Any]] = []
        for path, kind, source, required, redacted in _DIAGNOSE_ENTRIES:
            entry: dict[str, Any] = {
                "path": path,
                "kind": kind,
                "source": source,
                "required": required,
                "redacted": redacted,
            }
            if path == "process/backends.json":
                entry["record_count"] = len(backends)
            entries.append(entry)
        return as_json(
            _envelope(
                "diagnose",
                output=request.output_path or "bundle.tar.gz",
                bundle={
                    "format": "tar.gz",
                    "mode": "metadata-only",
                    "created": False,
                    "entries": entries,
                },
                files=[e["path"] for e in entries],
                redactions=_REDACTIONS,
                redaction_policy={
                    "home": {"replacement": "~"},
                    "secret-env": {"match": ["KEY", "TOKEN", "SECRET", "PASS"]},
                    "acl-identities": {"replacement": "stable-hash"},
                },
            )
        )
    if verb is AdminVerb.METRICS:
        return AdminReply(
            kind=_WireReplyKind.ValueType(AdminReplyKind.OPENMETRICS),
            body=metrics_text(broker),
            content_type=_OPENMETRICS,
        )
    if verb is AdminVerb.SHUTDOWN:
        drain = request.drain_deadline_ms / 1000 if request.drain_deadline_ms else None
        broker.request_shutdown(drain)
        return as_text("broker shutting down\n")
    return as_text("unsupported admin verb\n", 2)


async def handle_admin_frame(broker: Broker, frame: Frame) -> bytes | None:
    """Validate an admin frame and return the framed reply, or ``None`` (no reply).

    Invalid admin frames get no reply frame, as in the reference: the connection
    is simply closed.
    """
    if check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.ADMIN):
        return None
    try:
        request = decode(AdminRequest, frame.payload)
    except MalformedMessage:
        return None
    await trio.lowlevel.checkpoint()
    reply = render(broker, request)
    return framed(response_to(frame, encode(reply)))


def operation_from_request(
    message: LifecycleMessage,
) -> tuple[BroadcastOperation, float | None] | None:
    if message.WhichOneof("body") != "broadcast_request":
        return None
    req = message.broadcast_request
    operation = control.get_operation(req)
    if operation is None:
        return None
    return operation, (req.ack_timeout_ms / 1000 if req.ack_timeout_ms else None)


async def handle_lifecycle_frame(broker: Broker, frame: Frame) -> bytes | None:
    """Serve an operator's broadcast request; ``None`` for anything else.

    Cancellation: cancelling abandons the broadcast's outstanding ACK waits.
    """
    if check_envelope(frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.LIFECYCLE):
        return None
    try:
        parsed = operation_from_request(decode(LifecycleMessage, frame.payload))
    except MalformedMessage:
        return None
    if parsed is None:
        return None
    operation, timeout = parsed
    result = await broker.broadcast(operation, ack_timeout_s=timeout)
    body = _envelope("broadcast", **result.to_json())
    report = LifecycleMessage(
        broadcast_report=BroadcastReport(json=json.dumps(body, sort_keys=True))
    )
    return framed(response_to(frame, encode(report)))
