"""Admin verbs (``0xAD01``) and operator broadcast requests on the broker socket.

What this module does: validates an admin frame, renders the reply of each verb
of SPEC §8 / facts §8 (STATUS as JSON or text, DUMP, LIST_INSTANCES, HEALTHZ,
READYZ, BACKEND_HEALTH, CONFIG, DIAGNOSE, METRICS, SHUTDOWN; anything else is
"unsupported admin verb" with exit 2), every JSON body in the common envelope
(``schema_version: 1``, ``command``, ``generated_at_unix_ms``; ``envelope``,
also used by ``operator_lane`` for the lifecycle-lane reports).

BACKEND_HEALTH also says whether the service has a usable definition and gives a
verdict (available / unavailable / unknown). The second half renders these JSON
documents as text for people (``status_text``, ``dump_text``, ...), which the CLI
prints; the wire's own STATUS text stays the reference's two lines.

What it does not do: own any state. It reads the broker it is given and calls its
public methods (``request_shutdown``, ``broadcast``). DIAGNOSE describes a bundle
and says that it wrote none.
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.logfmt import KeyValues, text_value
from rpbroker.policy.broadcast import BroadcastOperation
from rpbroker.policy.hello import is_valid_service_name
from rpbroker.services import ServiceLoadError, ServiceNotFound, load_service
from rpbroker.wire import AdminReply, AdminRequest, Frame, LifecycleMessage
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
#: DIAGNOSE's honest note: like the reference, the broker describes the bundle only.
DIAGNOSE_DETAIL = (
    "metadata only: the broker lists what a diagnostic bundle would hold; no file was written"
)


def envelope(command: str, **body: Any) -> dict[str, Any]:
    return {
        "schema_version": ADMIN_SCHEMA_VERSION,
        "command": command,
        "generated_at_unix_ms": int(time.time() * 1000),
        **body,
    }


def _backend_rows(broker: Broker) -> list[dict[str, Any]]:
    return [handle.to_json() for handle in broker.backends]


def status_document(broker: Broker) -> dict[str, Any]:
    return envelope(
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


class DefinitionState(enum.Enum):
    """Whether a service has a usable definition in the broker's services directory."""

    OK = "ok"
    NOT_FOUND = "not-found"
    INVALID = "invalid"


class ServiceVerdict(enum.Enum):
    """BACKEND_HEALTH's answer for one service (the CLI's exit status follows it)."""

    #: At least one of its backends is running.
    AVAILABLE = "available"
    #: It is defined (or has backends), but none is running: not started yet,
    #: starting, draining, crashed, or its definition is invalid.
    UNAVAILABLE = "unavailable"
    #: No definition and no backend: the broker does not know it.
    UNKNOWN = "unknown"


@attrs.frozen
class Definition:
    """What the services directory says about one service name."""

    state: DefinitionState
    detail: str | None = None


async def look_up_definition(broker: Broker, name: str) -> Definition:
    """Load ``name``'s definition off the event loop and say whether it is usable.

    Cancellation: abandons the lookup (the worker thread finishes on its own).
    """
    try:
        await trio.to_thread.run_sync(load_service, broker.config.services_dir, name)
    except ServiceNotFound:
        return Definition(DefinitionState.NOT_FOUND)
    except ServiceLoadError as exc:
        return Definition(DefinitionState.INVALID, str(exc))
    return Definition(DefinitionState.OK)


def backend_health_document(broker: Broker, service: str, definition: Definition) -> dict[str, Any]:
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
    if any(row["state"] == "running" for row in rows):
        verdict = ServiceVerdict.AVAILABLE
    elif rows or definition.state is not DefinitionState.NOT_FOUND:
        verdict = ServiceVerdict.UNAVAILABLE
    else:
        verdict = ServiceVerdict.UNKNOWN
    return envelope(
        "backend-health",
        service_name=service,
        backends=rows,
        definition={"state": definition.state.value, "detail": definition.detail},
        verdict=verdict.value,
    )


def render(
    broker: Broker, request: AdminRequest, *, definition: Definition | None = None
) -> AdminReply:
    """The reply to one admin request. Side effects: SHUTDOWN requests a shutdown.

    ``definition`` is BACKEND_HEALTH's service definition lookup (``look_up_definition``);
    without it the service is reported as not found.
    """
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
            envelope(
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
            envelope(
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
        return as_json(
            backend_health_document(
                broker,
                request.service_name or "unknown",
                definition or Definition(DefinitionState.NOT_FOUND),
            )
        )
    if verb is AdminVerb.CONFIG:
        return as_json(envelope("config", values=_config_values(broker)))
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
            envelope(
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
                detail=DIAGNOSE_DETAIL,
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
    definition = None
    health = int(request.verb) == AdminVerb.BACKEND_HEALTH
    if health and is_valid_service_name(request.service_name):
        definition = await look_up_definition(broker, request.service_name)
    await trio.lowlevel.checkpoint()
    reply = render(broker, request, definition=definition)
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


# -- text for operators ----------------------------------------------------------------
# The CLI asks for JSON and renders it with these (the wire's STATUS text stays the
# reference's two lines). Times are shown relative to the document's
# ``generated_at_unix_ms``, so the same document always renders the same text.

_BACKEND_COLUMNS = (
    "SERVICE",
    "VERSION",
    "INSTANCE",
    "PID",
    "STATE",
    "UPTIME",
    "CONNS",
    "LAST ACTIVITY",
)


def human_duration(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h04m``, ``2d03h``: two units at most, whole seconds."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _since(now_ms: int, then_ms: Any) -> str:
    if not isinstance(then_ms, int) or then_ms <= 0:
        return "-"
    return human_duration((now_ms - then_ms) / 1000)


def _ago(now_ms: int, then_ms: Any) -> str:
    if not isinstance(then_ms, int) or then_ms <= 0:
        return "never"
    if now_ms - then_ms < 1000:
        return "just now"
    return f"{human_duration((now_ms - then_ms) / 1000)} ago"


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def iso_time(unix_ms: int) -> str:
    """``unix_ms`` as an ISO 8601 UTC time with milliseconds (``...Z``)."""
    moment = datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def backend_table(rows: list[dict[str, Any]], now_ms: int) -> list[str]:
    """One line per backend under a header; ``no backends`` when there are none."""
    if not rows:
        return ["no backends running"]
    cells = [
        (
            str(row.get("service_name", "")),
            str(row.get("service_version", "")),
            str(row.get("instance", "")),
            str(row.get("pid") or "-"),
            str(row.get("state", "")),
            _since(now_ms, row.get("started_at_unix_ms")),
            str(row.get("open_connections", "-")),
            _ago(now_ms, row.get("last_active_unix_ms")),
        )
        for row in rows
    ]
    return _table(_BACKEND_COLUMNS, cells)


def status_text(document: Mapping[str, Any]) -> str:
    """The STATUS JSON document as a short summary and a backend table."""
    now = int(document["generated_at_unix_ms"])
    fd = document.get("fd_pressure", {})
    accepting = "accepting Hellos" if document.get("accepting_hello") else "NOT accepting Hellos"
    pressure = (
        f"DEMOTED: handoff off ({_plural(fd.get('episodes', 0), 'episode')}, "
        f"{_plural(fd.get('refusals', 0), 'refusal')})"
        if fd.get("demoted")
        else "none"
    )
    summary = [
        (
            "broker",
            f"{document.get('broker_instance')} (pid {document.get('broker_pid')}), "
            f"up {human_duration(float(document.get('uptime_seconds', 0)))}, {accepting}",
        ),
        ("socket", str(document.get("broker_socket", "-"))),
        (
            "connections",
            f"{document.get('connections_open', 0)} open, "
            f"{document.get('pending_handoffs', 0)} handoffs pending",
        ),
        ("fd pressure", pressure),
    ]
    width = max(len(key) for key, _ in summary)
    lines = [f"{key.ljust(width)}  {value}" for key, value in summary]
    return "\n".join([*lines, "", *backend_table(list(document.get("backends", [])), now)]) + "\n"


def config_lines(values: Mapping[str, Any]) -> list[str]:
    """Effective config leaves as ``section.key  value  (source)`` lines, sorted."""
    cells = [
        (f"{section}.{key}", text_value(leaf.get("value")), f"({leaf.get('source')})")
        for section, leaves in sorted(values.items())
        for key, leaf in sorted(leaves.items())
    ]
    return _table(("SETTING", "VALUE", "SOURCE"), cells) if cells else ["(none)"]


def event_line(event: Mapping[str, Any]) -> str:
    """One lifecycle event: its time, kind, then its fields as ``key=value``."""
    fields = KeyValues.of(
        service=event.get("service_name"),
        version=event.get("service_version"),
        pid=event.get("pid") or None,
        reason=event.get("reason"),
        **dict(event.get("details") or {}),
    )
    return f"{iso_time(int(event.get('at_unix_ms', 0)))}  {event.get('kind')}  {fields}".rstrip()


def dump_text(document: Mapping[str, Any]) -> str:
    """The DUMP document in readable sections: backends, spawn budgets, config, events."""
    now = int(document["generated_at_unix_ms"])
    budgets = [
        (
            str(row.get("service_name")),
            str(row.get("service_version")),
            str(row.get("broker_instance")),
            str(row.get("attempts_used")),
            str(row.get("remaining")),
            "yes" if row.get("in_flight") else "no",
            "-" if row.get("retry_after_ms") is None else f"{row['retry_after_ms']} ms",
        )
        for row in document.get("spawn_budgets", [])
    ]
    events = list(document.get("recent_lifecycle_events", []))
    sections = [
        f"broker {document.get('broker_instance')}, dump of {iso_time(now)}",
        "",
        "backends",
        *(f"  {line}" for line in backend_table(list(document.get("backend_table", [])), now)),
        "",
        "spawn budgets",
        *(
            f"  {line}"
            for line in (
                _table(
                    ("SERVICE", "VERSION", "INSTANCE", "USED", "LEFT", "IN FLIGHT", "RETRY AFTER"),
                    budgets,
                )
                if budgets
                else ["(none)"]
            )
        ),
        "",
        "effective config",
        *(f"  {line}" for line in config_lines(document.get("effective_config", {}))),
        "",
        f"recent lifecycle events ({len(events)}, oldest first)",
        *(f"  {event_line(event)}" for event in events),
    ]
    return "\n".join(sections) + "\n"


def backend_health_text(document: Mapping[str, Any]) -> str:
    """BACKEND_HEALTH as one verdict line and one line per backend."""
    now = int(document["generated_at_unix_ms"])
    service = document.get("service_name")
    verdict = document.get("verdict", ServiceVerdict.UNKNOWN.value)
    rows = list(document.get("backends", []))
    definition = document.get("definition") or {}
    if verdict == ServiceVerdict.UNKNOWN.value:
        head = f"{service}: unknown service (no definition in the broker's services directory)"
    elif verdict == ServiceVerdict.AVAILABLE.value:
        head = f"{service}: available"
    elif definition.get("state") == DefinitionState.INVALID.value:
        head = f"{service}: unavailable: invalid definition: {definition.get('detail')}"
    elif not rows:
        head = f"{service}: unavailable: no backend running (the next Hello starts one)"
    else:
        head = f"{service}: unavailable: no backend is running"
    lines = [head]
    for row in rows:
        error = f", last error: {row['last_error']}" if row.get("last_error") else ""
        lines.append(
            f"  {row.get('service_version')} pid {row.get('pid') or '-'} {row.get('state')}, "
            f"last Hello {_ago(now, row.get('last_hello_unix_ms'))}{error}"
        )
    return "\n".join(lines) + "\n"


def diagnose_text(document: Mapping[str, Any]) -> str:
    """DIAGNOSE: whether a bundle was written, and what it holds (or would hold)."""
    bundle = document.get("bundle", {})
    entries = list(bundle.get("entries", []))
    if bundle.get("created"):
        head = f"wrote diagnostic bundle {document.get('output')} ({_plural(len(entries), 'file')})"
    else:
        head = f"no bundle written: {document.get('detail', DIAGNOSE_DETAIL)}"
    cells = [
        (
            str(e.get("path")),
            str(e.get("source")),
            "required" if e.get("required") else "optional",
            "redacted" if e.get("redacted") else "-",
        )
        for e in entries
    ]
    table = _table(("ENTRY", "SOURCE", "NEED", "REDACTION"), cells) if cells else []
    return "\n".join([head, *(f"  {line}" for line in table)]) + "\n"
