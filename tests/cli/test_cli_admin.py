"""The admin commands as an operator reads them: status table, dump, health, diagnose, metrics.

A broker runs in the test (``open_broker``, real backends); every command is the
real ``rpbroker`` in a child process, pointed at it with ``$RPBROKER_SOCKET``.
"""

from __future__ import annotations

import json
import re

import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import rpbroker
from rpbroker import admin
from rpbroker.metrics import FROZEN_METRIC_NAMES, BrokerMetrics

from ..e2e.support import Workspace, round_trip
from .support import environment, run_rpbroker, write_echo_service

#: facts §9, byte for byte: renaming a sample needs protocol v2.
FROZEN_SAMPLE_NAMES = (
    "running_process_broker_v1_hello_total",
    "running_process_broker_v1_hello_duration_seconds",
    "running_process_broker_v1_active_backends",
    "running_process_broker_v1_spawn_attempts_total",
    "running_process_broker_v1_spawn_budget_remaining",
    "running_process_broker_v1_connections_open",
    "running_process_broker_v1_fd_usage_ratio",
    "running_process_broker_v1_uptime_seconds",
)


def parse_openmetrics(text: str) -> list[Metric]:
    """Every family in ``text``; the parser raises on anything OpenMetrics does not allow."""
    return list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]


HUMAN_AGE = re.compile(r"^(just now|\d+s ago|\d+m\d\ds ago)$")
HUMAN_UPTIME = re.compile(r"^(\d+s|\d+m\d\ds)$")


async def rpbroker_cmd(broker: rpbroker.Broker, *args: str) -> tuple[int, str, str]:
    result = await run_rpbroker(*args, env=environment(RPBROKER_SOCKET=broker.socket_path))
    return result.returncode, result.stdout, result.stderr


async def warm(broker: rpbroker.Broker, *services: str) -> None:
    for service in services:
        async with rpbroker.connect(service, "1.0.0", broker=broker.socket_path) as stream:
            assert await round_trip(stream, b"w") == b"w"
    await broker.wait_connections_closed()


def columns(header: str, line: str) -> dict[str, str]:
    """Cut a table line at the header's column starts."""
    names = re.findall(r"\S+(?: \S+)*", header)
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return {n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}


async def test_status_is_a_table_with_one_row_per_backend(workspace: Workspace) -> None:
    write_echo_service(workspace.services, "echo")
    write_echo_service(workspace.services, "other")
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo", "other")
            held = await rpbroker.open_connection("echo", "1.0.0", broker=broker.socket_path)
            assert await round_trip(held, b"h") == b"h"
            code, out, err = await rpbroker_cmd(broker, "status")
            await held.aclose()
            handles = {h.key.service_name: h for h in broker.backends}
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("broker       shared (pid ")
    assert "accepting Hellos" in lines[0]
    assert lines[1] == f"socket       {workspace.socket}"
    header = lines[5]
    assert re.findall(r"\S+(?: \S+)*", header) == [
        "SERVICE", "VERSION", "INSTANCE", "PID", "STATE", "UPTIME", "CONNS", "LAST ACTIVITY",
    ]  # fmt: skip
    rows = [columns(header, line) for line in lines[6:]]
    assert [row["SERVICE"] for row in rows] == ["echo", "other"]
    for row in rows:
        handle = handles[row["SERVICE"]]
        assert row["VERSION"] == "1.0.0"
        assert row["INSTANCE"] == handle.key.instance
        assert row["PID"] == str(handle.pid)
        assert row["STATE"] == "running"
        assert HUMAN_UPTIME.match(row["UPTIME"]), row
        assert HUMAN_AGE.match(row["LAST ACTIVITY"]), row
        assert row["CONNS"].isdigit()


def test_status_text_renders_durations_in_human_units() -> None:
    now = 1_800_000_000_000
    document = {
        "generated_at_unix_ms": now,
        "broker_instance": "shared",
        "broker_pid": 7,
        "broker_socket": "/run/b.sock",
        "uptime_seconds": 93784.5,
        "accepting_hello": False,
        "connections_open": 2,
        "pending_handoffs": 1,
        "fd_pressure": {"demoted": True, "episodes": 1, "refusals": 3},
        "backends": [
            {
                "service_name": "db",
                "service_version": "2.0.0",
                "instance": "shared",
                "pid": 42,
                "state": "draining",
                "open_connections": 1,
                "started_at_unix_ms": now - 3_725_000,
                "last_active_unix_ms": now - 125_000,
            }
        ],
    }
    assert admin.status_text(document).splitlines() == [
        "broker       shared (pid 7), up 1d02h, NOT accepting Hellos",
        "socket       /run/b.sock",
        "connections  2 open, 1 handoffs pending",
        "fd pressure  DEMOTED: handoff off (1 episode, 3 refusals)",
        "",
        "SERVICE  VERSION  INSTANCE  PID  STATE     UPTIME  CONNS  LAST ACTIVITY",
        "db       2.0.0    shared    42   draining  1h02m   1      2m05s ago",
    ]
    assert admin.status_text({**document, "backends": []}).splitlines()[-1] == (
        "no backends running"
    )


async def test_status_json_rows_carry_started_at(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            code, out, _ = await rpbroker_cmd(broker, "status", "--json")
    [row] = json.loads(out)["backends"]
    assert code == 0
    assert row["started_at_unix_ms"] <= row["last_active_unix_ms"]


async def test_dump_is_readable(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            code, out, err = await rpbroker_cmd(broker, "dump")
            pid = next(iter(broker.backends)).pid
    assert code == 0, err
    lines = out.splitlines()
    assert "spawn budgets" in lines and "effective config" in lines
    assert any(
        re.fullmatch(r"  limits\.hello_timeout_ms +30000 +\(config\)", line) for line in lines
    )
    events = lines[lines.index(next(x for x in lines if x.startswith("recent lifecycle"))) + 1 :]
    running = next(line for line in events if "  running  " in line)
    assert f"service=echo version=1.0.0 pid={pid} endpoint=" in running
    assert not any(line.lstrip().startswith(("{", "[")) for line in lines), "no raw JSON"


async def test_backend_health_exit_status_follows_the_verdict(workspace: Workspace) -> None:
    write_echo_service(workspace.services, "echo")
    write_echo_service(workspace.services, "idle")
    broken_file = workspace.services / "broken.toml"
    broken_file.write_text('service_name = "broken"\ncommand = 3\n')
    broken_file.chmod(0o600)
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            pid = next(iter(broker.backends)).pid
            running = await rpbroker_cmd(broker, "backend-health", "echo")
            idle = await rpbroker_cmd(broker, "backend-health", "idle")
            broken = await rpbroker_cmd(broker, "backend-health", "broken")
            unknown = await rpbroker_cmd(broker, "backend-health", "nosuch")
            as_json = await rpbroker_cmd(broker, "backend-health", "nosuch", "--json")
    assert running[0] == 0
    assert running[1].splitlines()[0] == "echo: available"
    assert f"1.0.0 pid {pid} running" in running[1]
    assert idle[:2] == (1, "idle: unavailable: no backend running (the next Hello starts one)\n")
    assert broken[0] == 1
    assert broken[1].startswith("broken: unavailable: invalid definition: ")
    assert unknown[:2] == (
        4,
        "nosuch: unknown service (no definition in the broker's services directory)\n",
    )
    document = json.loads(as_json[1])
    assert as_json[0] == 4
    assert (document["verdict"], document["definition"]) == (
        "unknown",
        {"state": "not-found", "detail": None},
    )


async def test_diagnose_says_it_writes_no_bundle(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    cwd = workspace.root / "cwd"
    cwd.mkdir()
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config()) as broker:
            env = environment(RPBROKER_SOCKET=broker.socket_path)
            text = await run_rpbroker("diagnose", env=env, cwd=cwd)
            as_json = await run_rpbroker("diagnose", "--json", env=env, cwd=cwd)
    assert text.returncode == 0
    head, *entries = text.stdout.splitlines()
    assert head == f"no bundle written: {admin.DIAGNOSE_DETAIL}"
    assert len(entries) == 9 and entries[1].split()[0] == "admin/status.json"
    document = json.loads(as_json.stdout)
    assert document["bundle"]["created"] is False
    assert document["detail"] == admin.DIAGNOSE_DETAIL
    assert list(cwd.iterdir()) == [], "nothing was written"


async def test_metrics_is_valid_openmetrics_with_the_frozen_names(workspace: Workspace) -> None:
    write_echo_service(workspace.services)
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            code, out, err = await rpbroker_cmd(broker, "metrics")
    assert code == 0, err
    parsed = parse_openmetrics(out)
    # The frozen v1 families first, in order; rpbroker's own after them.
    families = [f for f in parsed if f.name.startswith("running_process_broker_v1_")]
    assert [(f.name, f.type) for f in families] == [
        ("running_process_broker_v1_hello", "counter"),
        ("running_process_broker_v1_hello_duration_seconds", "histogram"),
        ("running_process_broker_v1_active_backends", "gauge"),
        ("running_process_broker_v1_spawn_attempts", "counter"),
        ("running_process_broker_v1_spawn_budget_remaining", "gauge"),
        ("running_process_broker_v1_connections_open", "gauge"),
        ("running_process_broker_v1_fd_usage_ratio", "gauge"),
        ("running_process_broker_v1_uptime_seconds", "gauge"),
    ]
    assert parsed[: len(families)] == families
    assert [(f.name, f.type) for f in parsed[len(families) :]] == [
        ("rpbroker_handoff_plans", "counter"),
        ("rpbroker_handoff_results", "counter"),
        ("rpbroker_connection_errors", "counter"),
    ]
    own = {s.name: s for f in parsed[len(families) :] for s in f.samples}
    assert own["rpbroker_handoff_plans_total"].labels == {"plan": "attempt"}
    assert own["rpbroker_handoff_results_total"].labels == {"result": "completed"}
    samples = {s.name: s for f in families for s in f.samples}
    hello = samples["running_process_broker_v1_hello_total"]
    assert hello.labels == {"service": "echo", "version": "1.0.0", "outcome": "negotiated"}
    assert hello.value == 1
    assert samples["running_process_broker_v1_hello_duration_seconds_count"].value == 1
    assert families[1].unit == "seconds" and families[-1].unit == "seconds"
    base = {re.sub(r"_(bucket|sum|count)$", "", name) for name in samples}
    assert base <= set(FROZEN_SAMPLE_NAMES)


def test_metric_names_are_frozen_and_the_text_parses_with_odd_labels() -> None:
    assert FROZEN_METRIC_NAMES == FROZEN_SAMPLE_NAMES
    metrics = BrokerMetrics()
    odd = 'we"ird\\na\nme'
    metrics.hello(odd, "1.0.0", "negotiated", 0.002)
    metrics.hello(odd, "1.0.0", "negotiated", 7.0)
    metrics.spawn(odd, "1.0.0", "failed")
    text = metrics.render(
        active_backends={odd: 2},
        budget_remaining={(odd, "1.0.0"): 0},
        connections_open=3,
        fd_usage_ratio=0.25,
        uptime_seconds=61.9,
    )
    families = {f.name: f for f in parse_openmetrics(text)}
    buckets = [
        s
        for s in families["running_process_broker_v1_hello_duration_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert [s.value for s in buckets] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 2]
    assert {s.labels["service"] for s in buckets} == {odd}
    [uptime] = families["running_process_broker_v1_uptime_seconds"].samples
    assert uptime.value == 61


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"),
     (86399, "23h59m"), (86400, "1d00h"), (-5, "0s")],
)  # fmt: skip
def test_human_duration(seconds: float, text: str) -> None:
    assert admin.human_duration(seconds) == text


async def test_no_broker_names_the_socket_and_how_it_was_chosen(workspace: Workspace) -> None:
    gone = str(workspace.runtime / "gone.sock")
    for command in ("status", "dump", "metrics", "backend-health"):
        args = (command, "echo") if command == "backend-health" else (command,)
        result = await run_rpbroker(*args, "--socket", gone)
        assert result.returncode == 3
        assert result.stderr.startswith(f"rpbroker: no broker at {gone}")
        assert "$RPBROKER_SOCKET" in result.stderr
