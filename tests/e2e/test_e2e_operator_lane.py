"""One service at a time, and the event and output streams, against real backends.

A real broker runs in the test with real SDK backends; the operator's side is
``rpbroker.admin_client`` (what the CLI calls). Stop ends a service's backends
and keeps it stopped (Hellos refused, no recovery respawn) until a restart;
restart lets the next Hello start a fresh backend; quiesce reaches only that
service's backends. Streams send the kept history, then live records; a
follower that hangs up leaves no subscription and no connection behind, and
every follower is ended (with an end record) when the broker stops.
"""

from __future__ import annotations

import json

import pytest
import trio

import rpbroker
from rpbroker.admin_client import read_stream, service_command
from rpbroker.events import EventKind
from rpbroker.wire import StreamRecord
from rpbroker.wire.codes import (
    RefusalCode,
    ServiceCommand,
    ServiceCommandOutcome,
    StreamEndReason,
    StreamSource,
)

from .support import Workspace, round_trip

GUARD_S = 40


async def warm(broker: rpbroker.Broker, service: str) -> None:
    async with rpbroker.connect(service, "1.0.0", broker=broker.socket_path) as stream:
        assert await round_trip(stream, b"w") == b"w"
    await broker.wait_connections_closed()


async def test_stop_keeps_a_service_stopped_until_restart_starts_a_fresh_one(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    workspace.add_service("other")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            await warm(broker, "other")
            [first] = broker.backends.of_service("echo")
            [other] = broker.backends.of_service("other")
            result = await service_command(
                broker.socket_path, ServiceCommand.STOP, "echo", command_timeout_s=5
            )
            assert result.outcome is ServiceCommandOutcome.DONE, result.document
            assert first.ended.is_set() and first.status == "stopped"
            assert broker.backends.of_service("echo") == []
            assert other.routable, "stop reached another service"
            [row] = result.document["backends"]
            assert row["pid"] == first.pid and row["state"] == "stopped"
            assert result.document["held"] is True
            # Stopped, not crashed: no retry, and Hellos are refused with the fix.
            assert not [e for e in broker.recent_events() if e.kind is EventKind.RETRYING]
            with pytest.raises(rpbroker.RefusedError) as info:
                await rpbroker.open_connection("echo", "1.0.0", broker=broker.socket_path)
            assert info.value.code is RefusalCode.BACKEND_SPAWN_FAILED
            assert "rpbroker restart echo" in info.value.reason
            assert broker.backends.of_service("echo") == []

            result = await service_command(broker.socket_path, ServiceCommand.RESTART, "echo")
            assert result.outcome is ServiceCommandOutcome.DONE, result.document
            assert result.document["backends"] == [] and result.document["held"] is False
            await warm(broker, "echo")
            [fresh] = broker.backends.of_service("echo")
            assert fresh.pid != first.pid and fresh.routable


async def test_restart_of_a_running_service_replaces_its_backend(workspace: Workspace) -> None:
    workspace.add_service("echo")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            [first] = broker.backends.of_service("echo")
            result = await service_command(broker.socket_path, ServiceCommand.RESTART, "echo")
            assert result.outcome is ServiceCommandOutcome.DONE
            assert [row["pid"] for row in result.document["backends"]] == [first.pid]
            assert first.ended.is_set()
            await warm(broker, "echo")
            [fresh] = broker.backends.of_service("echo")
            assert fresh.pid != first.pid


async def test_quiesce_reaches_only_that_services_backends(workspace: Workspace) -> None:
    workspace.add_service("echo")
    workspace.add_service("other")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            await warm(broker, "other")
            [echo] = broker.backends.of_service("echo")
            [other] = broker.backends.of_service("other")
            result = await service_command(broker.socket_path, ServiceCommand.QUIESCE, "echo")
            assert result.outcome is ServiceCommandOutcome.DONE, result.document
            assert result.document["sent_count"] == 1
            assert [a["pid"] for a in result.document["acks"]] == [echo.pid]
            await echo.ended.wait()  # it drained and exited
            assert echo.status == "stopped"
            assert other.routable
            await warm(broker, "echo")  # not held: the next Hello starts a fresh one
            [fresh] = broker.backends.of_service("echo")
            assert fresh.pid != echo.pid


@pytest.mark.parametrize("command", [ServiceCommand.STOP, ServiceCommand.QUIESCE])
async def test_an_unknown_service_is_reported_and_nothing_is_touched(
    workspace: Workspace, command: ServiceCommand
) -> None:
    workspace.add_service("echo")
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            result = await service_command(broker.socket_path, command, "nosuch")
            bad = await service_command(broker.socket_path, command, "bad name!")
            [echo] = list(broker.backends)
            assert echo.routable
            assert not broker.backends.is_held("nosuch")
    assert result.outcome is ServiceCommandOutcome.UNKNOWN_SERVICE
    assert "unknown service 'nosuch'" in result.document["detail"]
    assert bad.outcome is ServiceCommandOutcome.BAD_REQUEST


async def test_events_stream_sends_the_history_then_ends(workspace: Workspace) -> None:
    workspace.add_service("echo")
    records: list[StreamRecord] = []
    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "echo")
            summary = await read_stream(broker.socket_path, StreamSource.EVENTS, records.append)
            expected = [e.to_json() for e in broker.recent_events()]
    assert summary.reason is StreamEndReason.HISTORY_SENT
    got = [json.loads(r.event_json) for r in records]
    assert got == expected[: len(got)] and len(got) >= 3
    assert {"broker-started", "spawning", "running"} <= {e["kind"] for e in got}


async def test_following_events_gets_live_ones_and_a_follower_that_leaves_costs_nothing(
    workspace: Workspace,
) -> None:
    workspace.add_service("echo")
    seen_running = trio.Event()
    subscribed = trio.Event()  # the history comes after the subscription
    kinds: list[str] = []

    def on_record(record: StreamRecord) -> None:
        subscribed.set()
        kinds.append(json.loads(record.event_json)["kind"])
        if kinds[-1] == "running":
            seen_running.set()

    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: read_stream(
                        broker.socket_path, StreamSource.EVENTS, on_record, follow=True
                    )
                )
                await subscribed.wait()
                assert broker.events.subscriber_count == 1
                await warm_while_following(broker)
                await seen_running.wait()
                nursery.cancel_scope.cancel()
            # The follower hung up: its task ended and its subscription went with it.
            await broker.wait_connections_closed()
            assert broker.events.subscriber_count == 0
    assert kinds[0] == "broker-started" and "spawning" in kinds


async def warm_while_following(broker: rpbroker.Broker, service: str = "echo") -> None:
    """One Hello while a follower holds a connection (so not waiting for none open)."""
    async with rpbroker.connect(service, "1.0.0", broker=broker.socket_path) as stream:
        assert await round_trip(stream, b"w") == b"w"


async def test_a_follower_is_ended_with_an_end_record_when_the_broker_stops(
    workspace: Workspace,
) -> None:
    workspace.add_service("noisy", mode="noisy")
    ends: dict[StreamSource, object] = {}
    events: list[str] = []
    started = {source: trio.Event() for source in StreamSource}

    async def follow(source: StreamSource) -> None:
        def on_record(record: StreamRecord) -> None:
            started[source].set()  # history arrives after the subscription is made
            if source is StreamSource.EVENTS:
                events.append(json.loads(record.event_json)["kind"])

        summary = await read_stream(socket, source, on_record, service_name="noisy", follow=True)
        ends[source] = summary.reason

    with trio.fail_after(GUARD_S):
        async with (
            trio.open_nursery() as nursery,
            rpbroker.open_broker(workspace.config()) as broker,
        ):
            socket = broker.socket_path
            await warm(broker, "noisy")
            nursery.start_soon(follow, StreamSource.EVENTS)
            nursery.start_soon(follow, StreamSource.BACKEND_OUTPUT)
            await started[StreamSource.EVENTS].wait()
            await started[StreamSource.BACKEND_OUTPUT].wait()
            assert broker.events.subscriber_count == 1
            assert broker.backends.output.follower_count == 1
    assert ends == {
        StreamSource.EVENTS: StreamEndReason.BROKER_STOPPING,
        StreamSource.BACKEND_OUTPUT: StreamEndReason.BROKER_STOPPING,
    }
    assert events[-1] == "broker-stopping"


async def test_logs_stream_the_kept_lines_then_live_ones(workspace: Workspace) -> None:
    workspace.add_service("noisy", mode="noisy")
    live: list[tuple[int, str]] = []
    fresh_done = trio.Event()
    following = trio.Event()
    first_pid = 0

    def on_line(record: StreamRecord) -> None:
        following.set()  # the kept lines come after the follower is registered
        line = record.output_line
        live.append((line.pid, line.text))
        if line.text == "flood done" and line.pid != first_pid:
            fresh_done.set()

    with trio.fail_after(GUARD_S):
        async with rpbroker.open_broker(workspace.config()) as broker:
            await warm(broker, "noisy")
            [first] = broker.backends.of_service("noisy")
            first_pid = first.pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: read_stream(
                        broker.socket_path,
                        StreamSource.BACKEND_OUTPUT,
                        on_line,
                        service_name="noisy",
                        follow=True,
                    )
                )
                await following.wait()
                assert broker.backends.output.follower_count == 1
                # A fresh backend writes while the follower is there: live lines.
                await service_command(broker.socket_path, ServiceCommand.RESTART, "noisy")
                await warm_while_following(broker, "noisy")
                await fresh_done.wait()
                nursery.cancel_scope.cancel()
            kept: list[StreamRecord] = []
            summary = await read_stream(
                broker.socket_path, StreamSource.BACKEND_OUTPUT, kept.append, service_name="noisy"
            )
            unknown = await read_stream(
                broker.socket_path, StreamSource.BACKEND_OUTPUT, kept.append, service_name="nosuch"
            )
            await broker.wait_connections_closed()
            assert broker.backends.output.follower_count == 0
    assert (first_pid, "hello from stderr") in live  # kept
    fresh = {text for pid, text in live if pid != first_pid}
    assert {"hello from stdout", "hello from stderr"} <= fresh  # live
    assert summary.reason is StreamEndReason.HISTORY_SENT
    texts = [r.output_line.text for r in kept]
    assert "hello from stderr" in texts and "flood done" in texts
    stderr = [r.output_line for r in kept if r.output_line.text == "hello from stderr"]
    # Both backends' lines are kept, the ended one's first.
    assert stderr[0].pid == first_pid and len(stderr) == 2
    assert {(line.stream, line.service_version) for line in stderr} == {("stderr", "1.0.0")}
    assert unknown.reason is StreamEndReason.UNKNOWN_SERVICE
