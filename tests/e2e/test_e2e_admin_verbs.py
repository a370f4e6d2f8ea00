"""Every admin verb of SPEC §8, on the broker socket, through the wire and the CLI.

Each verb is asked of a live broker with a real backend, both with
``rpbroker.admin_client.admin_request`` (or a hand-made frame where the client
cannot express the request) and with the ``rpbroker`` command as a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import pytest
import trio

import rpbroker
import transports
from rpbroker.admin_client import admin_request
from rpbroker.events import EventKind
from rpbroker.metrics import FAMILIES, PREFIX
from rpbroker.wire.codes import AdminReplyKind, AdminVerb
from rpbroker.wire.frames import decode_frame, framed, request
from rpbroker.wire.framing import MAX_FRAME_BYTES, read_frame_body
from rpbroker.wire.protocols import PayloadProtocol

from .support import Workspace, round_trip
from .test_e2e_supervision_helpers import (
    admin_exchange,
    admin_frame,
    assert_envelope,
    json_body,
    read_admin_reply,
    run_cli,
    watch_events,
)

JSON_VERBS = {
    AdminVerb.STATUS: "status",
    AdminVerb.DUMP: "dump",
    AdminVerb.LIST_INSTANCES: "list-instances",
    AdminVerb.BACKEND_HEALTH: "backend-health",
    AdminVerb.CONFIG: "config",
    AdminVerb.DIAGNOSE: "diagnose",
}
CONFIG_SECTIONS = {
    "broker",
    "protocol",
    "limits",
    "paths",
    "spawn_budget",
    "handoff",
    "diagnostics",
}


async def warm(broker: rpbroker.Broker) -> int:
    """Start the echo backend, let every broker-side connection finish; return its pid."""
    async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
        assert await round_trip(stream, b"warm") == b"warm"
    await broker.wait_connections_closed()
    [handle] = list(broker.backends)
    return handle.pid


async def ask(broker: rpbroker.Broker, verb: AdminVerb, **options: Any) -> dict[str, Any]:
    reply = await admin_request(broker.socket_path, verb, json_output=True, **options)
    assert AdminReplyKind(reply.kind) is AdminReplyKind.JSON
    assert reply.exit_code == 0
    return json_body(reply, JSON_VERBS[verb])


async def test_status_json_describes_the_broker_and_its_backends(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        pid = await warm(broker)
        before = int(time.time() * 1000)
        status = await ask(broker, AdminVerb.STATUS)
        after = int(time.time() * 1000)
    assert before <= status["generated_at_unix_ms"] <= after
    assert status["broker_instance"] == "shared"
    assert status["broker_pid"] == os.getpid()
    assert status["broker_socket"] == broker.socket_path
    assert status["accepting_hello"] is True
    assert status["connections_open"] == 1, "only the admin connection itself"
    assert status["pending_handoffs"] == 0
    assert status["fd_pressure"] == {"demoted": False, "episodes": 0, "refusals": 0}
    assert status["inode_pressure"]["supported"] is False
    assert isinstance(status["uptime_seconds"], float)
    [row] = status["backends"]
    assert row["service_name"] == "echo"
    assert row["service_version"] == "1.0.0"
    assert row["pid"] == pid
    assert row["state"] == "running"
    assert row["backend_pipe"] == next(iter(broker.backends)).endpoint
    assert status == {**broker.status(), "generated_at_unix_ms": status["generated_at_unix_ms"],
                      "uptime_seconds": status["uptime_seconds"],
                      "connections_open": 1}  # fmt: skip


async def test_status_text_and_cli_forms(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        pid = await warm(broker)
        reply = await admin_request(broker.socket_path, AdminVerb.STATUS)
        assert AdminReplyKind(reply.kind) is AdminReplyKind.TEXT
        assert reply.content_type == "text/plain"
        # The wire's text form stays the reference's two lines ...
        assert reply.body == "broker_instance: shared\naccepting_hello: true\n"
        # ... while the command renders the JSON form as a table for people.
        text = await run_cli("status", "--socket", broker.socket_path)
        assert text.returncode == 0, text.stderr
        header, row = text.stdout.splitlines()[-2:]
        assert header.split() == [
            "SERVICE", "VERSION", "INSTANCE", "PID", "STATE", "UPTIME", "CONNS", "LAST", "ACTIVITY"
        ]  # fmt: skip
        assert row.split()[:5] == ["echo", "1.0.0", next(iter(broker.backends)).key.instance,
                                   str(pid), "running"]  # fmt: skip
        cli = await run_cli("status", "--socket", broker.socket_path, "--json")
        assert cli.returncode == 0
        document = json.loads(cli.stdout)
        assert_envelope(document, "status")
        assert [row["pid"] for row in document["backends"]] == [pid]


async def test_dump_carries_lifecycle_events_and_spawn_budgets(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        pid = await warm(broker)
        dump = await ask(broker, AdminVerb.DUMP)
        cli = await run_cli("dump", "--socket", broker.socket_path, "--json")
        readable = await run_cli("dump", "--socket", broker.socket_path)
    assert cli.returncode == 0
    assert json.loads(cli.stdout)["command"] == "dump"
    # Without --json the command renders the (always JSON) reply in sections.
    assert readable.returncode == 0, readable.stderr
    sections = [line for line in readable.stdout.splitlines() if line and not line[0].isspace()]
    assert sections[0].startswith("broker shared, dump of ")
    assert sections[1:4] == ["backends", "spawn budgets", "effective config"]
    assert sections[4].startswith("recent lifecycle events (")
    assert len(sections) == 5
    kinds = [e["kind"] for e in dump["recent_lifecycle_events"]]
    assert kinds[0] == "broker-started"
    assert kinds.index("spawning") < kinds.index("running")
    running = next(e for e in dump["recent_lifecycle_events"] if e["kind"] == "running")
    assert (running["service_name"], running["pid"]) == ("echo", pid)
    assert set(running) == {
        "kind", "at_unix_ms", "service_name", "service_version", "pid", "reason", "details",
    }  # fmt: skip
    # A successful spawn gives the key its whole budget back (facts §6).
    [budget] = dump["spawn_budgets"]
    assert budget == {
        "broker_instance": next(iter(broker.backends)).key.instance,
        "service_name": "echo",
        "service_version": "1.0.0",
        "attempts_used": 0,
        "remaining": 3,
        "in_flight": False,
        "retry_after_ms": None,
    }
    assert [row["pid"] for row in dump["backend_table"]] == [pid]
    assert set(dump["effective_config"]) == CONFIG_SECTIONS
    assert dump["broker_instance"] == "shared"


async def test_list_instances_healthz_and_readyz(broker: rpbroker.Broker) -> None:
    socket = broker.socket_path
    with trio.fail_after(20):
        listed = await ask(broker, AdminVerb.LIST_INSTANCES)
        assert listed["instances"] == [
            {"broker_instance": "shared", "pipe": socket, "pid": os.getpid(), "state": "running"}
        ]
        for verb, body in ((AdminVerb.HEALTHZ, "ok\n"), (AdminVerb.READYZ, "ready\n")):
            reply = await admin_request(socket, verb)
            assert AdminReplyKind(reply.kind) is AdminReplyKind.TEXT
            assert (reply.body, reply.exit_code) == (body, 0)
            cli = await run_cli(verb.name.lower(), "--socket", socket)
            assert (cli.returncode, cli.stdout) == (0, body)
        listed_cli = await run_cli("list-instances", "--socket", socket)
        assert listed_cli.returncode == 0, listed_cli.stderr
        assert json.loads(listed_cli.stdout)["instances"][0]["pipe"] == socket


async def test_backend_health_filters_by_service(echo_workspace: Workspace) -> None:
    echo_workspace.add_service("other")
    with trio.fail_after(20):
        async with rpbroker.open_broker(echo_workspace.config()) as broker:
            pid = await warm(broker)
            async with rpbroker.connect("other", "2.0.0", broker=broker.socket_path):
                pass
            health = await ask(broker, AdminVerb.BACKEND_HEALTH, service_name="echo")
            assert health["service_name"] == "echo"
            [row] = health["backends"]
            assert row["pid"] == pid
            assert (row["service_version"], row["state"], row["last_error"]) == (
                "1.0.0",
                "running",
                None,
            )
            assert isinstance(row["last_hello_unix_ms"], int)
            nobody = await ask(broker, AdminVerb.BACKEND_HEALTH, service_name="nosuch")
            assert (nobody["service_name"], nobody["backends"]) == ("nosuch", [])
            unnamed = await ask(broker, AdminVerb.BACKEND_HEALTH)
            assert unnamed["service_name"] == "unknown"
            cli = await run_cli("backend-health", "other", "--socket", broker.socket_path, "--json")
            assert cli.returncode == 0
            document = json.loads(cli.stdout)
            assert_envelope(document, "backend-health")
            assert [r["service_version"] for r in document["backends"]] == ["2.0.0"]


async def test_config_reports_effective_values_with_sources(echo_workspace: Workspace) -> None:
    config = echo_workspace.config(hello_timeout_s=12.5, ack_deadline_s=2.0, hello_rate_limit=99)
    with trio.fail_after(20):
        async with rpbroker.open_broker(config) as broker:
            values = (await ask(broker, AdminVerb.CONFIG))["values"]
            cli = await run_cli("config", "--socket", broker.socket_path, "--json")
    assert set(values) == CONFIG_SECTIONS
    for section in values.values():
        for leaf in section.values():
            assert set(leaf) == {"value", "source"}
    assert values["limits"]["hello_timeout_ms"] == {"value": 12500, "source": "config"}
    assert values["limits"]["hello_rate_limit"]["value"] == 99
    assert values["limits"]["max_frame_bytes"] == {
        "value": 16 * 1024 * 1024,
        "source": "protocol-v1",
    }
    assert values["limits"]["max_hello_bytes"]["value"] == 64 * 1024
    assert values["handoff"]["ack_deadline_ms"]["value"] == 2000
    assert values["protocol"]["admin_payload_protocol"]["value"] == "0xAD01"
    assert values["broker"]["broker_pid"] == {"value": os.getpid(), "source": "runtime"}
    assert values["broker"]["socket_path"]["value"] == echo_workspace.socket
    assert values["paths"]["service_definition_dir"]["value"] == str(echo_workspace.services)
    assert values["spawn_budget"]["default_attempts_per_window"]["value"] == 3
    assert cli.returncode == 0
    assert json.loads(cli.stdout)["values"]["limits"]["hello_timeout_ms"]["value"] == 12500


async def test_diagnose_describes_a_metadata_only_bundle(broker: rpbroker.Broker) -> None:
    with trio.fail_after(20):
        await warm(broker)
        diagnose = await ask(broker, AdminVerb.DIAGNOSE)
        cli = await run_cli("diagnose", "--socket", broker.socket_path, "--json")
    assert diagnose["output"] == "bundle.tar.gz"
    bundle = diagnose["bundle"]
    assert (bundle["format"], bundle["mode"], bundle["created"]) == (
        "tar.gz",
        "metadata-only",
        False,
    )
    paths = [entry["path"] for entry in bundle["entries"]]
    assert paths == diagnose["files"]
    assert paths == [
        "admin/status.json",
        "admin/dump.json",
        "config/effective.json",
        "metrics/openmetrics.txt",
        "events/lifecycle.jsonl",
        "manifest/backend-manifests.json",
        "process/backends.json",
        "system/summary.json",
    ]
    backends_entry = bundle["entries"][paths.index("process/backends.json")]
    assert backends_entry["record_count"] == 1
    assert diagnose["redactions"] == ["home", "secret-env", "acl-identities"]
    assert cli.returncode == 0
    assert json.loads(cli.stdout)["files"] == paths


async def test_metrics_render_the_eight_frozen_families_first_in_order(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(20):
        await warm(broker)
        reply = await admin_request(broker.socket_path, AdminVerb.METRICS)
        cli = await run_cli("metrics", "--socket", broker.socket_path)
    assert AdminReplyKind(reply.kind) is AdminReplyKind.OPENMETRICS
    assert reply.content_type == "application/openmetrics-text"
    assert reply.exit_code == 0
    text = reply.body
    assert text.endswith("# EOF\n")
    types = [line.split()[2:] for line in text.splitlines() if line.startswith("# TYPE ")]
    # The frozen v1 families first, in order; rpbroker's own families after them.
    assert types[:8] == [[family.family_name, family.kind.value] for family in FAMILIES]
    assert all(name.startswith("rpbroker_") for name, _kind in types[8:])
    assert f"{PREFIX}fd_usage_ratio 0.000000" not in text.splitlines()
    lines = text.splitlines()
    assert f'{PREFIX}hello_total{{service="echo",version="1.0.0",outcome="negotiated"}} 1' in lines
    assert f'{PREFIX}active_backends{{service="echo"}} 1' in lines
    assert f'{PREFIX}spawn_budget_remaining{{service="echo",version="1.0.0"}} 3' in lines
    assert f'{PREFIX}hello_duration_seconds_count{{service="echo"}} 1' in lines
    assert f"{PREFIX}connections_open 1" in lines
    assert cli.returncode == 0
    assert cli.stdout.rstrip("\n").endswith("# EOF")
    cli_types = [line.split()[2] for line in cli.stdout.splitlines() if line.startswith("# TYPE ")]
    assert cli_types[:8] == [family.family_name for family in FAMILIES]


async def test_metrics_count_spawn_attempts(broker: rpbroker.Broker) -> None:
    # rpbroker.metrics documents a spawn-attempt counter (BrokerMetrics.spawn) that
    # renders as spawn_attempts_total with service, version and outcome labels.
    with trio.fail_after(20):
        await warm(broker)
        reply = await admin_request(broker.socket_path, AdminVerb.METRICS)
    samples = [
        line
        for line in reply.body.splitlines()
        if line.startswith(f"{PREFIX}spawn_attempts_total{{")
    ]
    assert len(samples) == 1, f"one spawn happened, the counter shows {samples}"
    assert 'service="echo"' in samples[0] and samples[0].endswith(" 1")


@pytest.mark.parametrize("verb", [999, 0, 10, 20])
async def test_unknown_or_reserved_verb_is_unsupported_with_exit_2(
    broker: rpbroker.Broker, verb: int
) -> None:
    with trio.fail_after(20):
        reply = await admin_exchange(broker.socket_path, verb, json_output=True)
        assert AdminReplyKind(reply.kind) is AdminReplyKind.TEXT
        assert reply.body == "unsupported admin verb\n"
        assert reply.exit_code == 2
        assert (await admin_exchange(broker.socket_path, AdminVerb.HEALTHZ)).body == "ok\n"


async def test_invalid_admin_frames_get_no_reply_and_harm_nothing(broker: rpbroker.Broker) -> None:
    bad_payload = framed(request(PayloadProtocol.ADMIN, b"\xff\xff\xff", request_id=3))
    wrong_kind = request(PayloadProtocol.ADMIN, b"\x08\x04", request_id=4)
    wrong_kind.kind = 1  # type: ignore[assignment]  # RESPONSE
    with trio.fail_after(20):
        for data in (bad_payload, framed(wrong_kind)):
            stream = await transports.connect(broker.socket_path)
            async with stream:
                await stream.send_all(data)
                assert await stream.receive_some(100) == b"", "closed without a reply"
        assert (await admin_exchange(broker.socket_path, AdminVerb.HEALTHZ)).body == "ok\n"
        assert broker.accepting


async def test_admin_reply_echoes_request_id_and_trace_context(broker: rpbroker.Broker) -> None:
    req = request(
        PayloadProtocol.ADMIN,
        b"\x08\x04",
        request_id=44,
        traceparent="00-ab-cd-01",
        tracestate="k=v",
    )
    with trio.fail_after(20):
        stream = await transports.connect(broker.socket_path)
        async with stream:
            await stream.send_all(framed(req))
            frame = decode_frame(await read_frame_body(stream, MAX_FRAME_BYTES))
    assert (frame.request_id, frame.traceparent, frame.tracestate) == (44, "00-ab-cd-01", "k=v")
    assert frame.payload_protocol == PayloadProtocol.ADMIN


async def test_readyz_fails_and_healthz_stays_ok_while_draining(echo_workspace: Workspace) -> None:
    with trio.fail_after(30):
        async with rpbroker.open_broker(echo_workspace.config(drain_timeout_s=20)) as broker:
            held = await rpbroker.open_connection("echo", "1.0.0", broker=broker.socket_path)
            # Admin connections opened before the shutdown, asked during the drain.
            early = [await transports.connect(broker.socket_path) for _ in range(4)]
            async with watch_events(broker) as watch:
                broker.request_shutdown()
                await watch.wait_for(EventKind.DRAINING)
                replies = []
                for stream, verb in zip(
                    early,
                    (
                        AdminVerb.READYZ,
                        AdminVerb.HEALTHZ,
                        AdminVerb.STATUS,
                        AdminVerb.LIST_INSTANCES,
                    ),
                    strict=True,
                ):
                    await stream.send_all(admin_frame(verb, json_output=True))
                    replies.append(await read_admin_reply(stream))
                    await stream.aclose()
                ready, health, status, listed = replies
                assert (ready.body, ready.exit_code) == ("not ready\n", 1)
                assert (health.body, health.exit_code) == ("ok\n", 0)
                assert json_body(status, "status")["accepting_hello"] is False
                assert json_body(listed, "list-instances")["instances"][0]["state"] == "not-serving"
                await held.aclose()
                await broker.wait_stopped()


async def test_shutdown_verb_honours_drain_deadline_ms(echo_workspace: Workspace) -> None:
    with trio.fail_after(30):
        async with rpbroker.open_broker(echo_workspace.config(drain_timeout_s=30)) as broker:
            held = await rpbroker.open_connection("echo", "1.0.0", broker=broker.socket_path)
            assert await round_trip(held, b"x") == b"x"
            pid = next(iter(broker.backends)).pid
            async with watch_events(broker) as watch:
                result = await run_cli(
                    "shutdown", "--socket", broker.socket_path, "--drain-deadline-ms", "300"
                )
                assert (result.returncode, result.stdout) == (0, "broker shutting down\n")
                # The held connection would keep the backend draining for the configured
                # 30 s; the request's 300 ms deadline cuts it short.
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await held.receive_some(10) == b""
                await held.aclose()
                await broker.wait_stopped()
            [stopping] = watch.of(EventKind.BROKER_STOPPING)
            assert stopping.details["drain_timeout_ms"] == 300
            [stopped] = watch.of(EventKind.STOPPED)
            assert stopped.pid == pid
            assert not watch.of(EventKind.CRASHED)


async def test_every_json_verb_uses_the_common_envelope_on_wire_and_cli(
    broker: rpbroker.Broker,
) -> None:
    with trio.fail_after(30):
        await warm(broker)
        for verb, command in JSON_VERBS.items():
            # Without the json flag too: every verb but STATUS answers JSON anyway.
            reply = await admin_request(
                broker.socket_path, verb, json_output=verb is AdminVerb.STATUS
            )
            json_body(reply, command)
        outputs: dict[str, Any] = {}

        async def cli(command: str, *extra: str) -> None:
            outputs[command] = await run_cli(
                command, *extra, "--socket", broker.socket_path, "--json"
            )

        async with trio.open_nursery() as nursery:
            for command in JSON_VERBS.values():
                extra = ("echo",) if command == "backend-health" else ()
                nursery.start_soon(cli, command, *extra)
    for command, result in outputs.items():
        assert result.returncode == 0, result.stderr
        assert_envelope(json.loads(result.stdout), command)
