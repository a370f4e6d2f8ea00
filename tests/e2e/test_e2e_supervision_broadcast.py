"""Lifecycle broadcasts to live, dead, slow and failing backends (real processes).

SPEC §7: release-handles and quiesce reach every live backend concurrently, each
bounded by its own ACK timeout; dead backends are skipped and reported; the result
lists acks, timeouts and failures per backend. The CLI sends the same broadcasts.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import trio

import rpbroker
from rpbroker.events import EventKind
from rpbroker.policy.broadcast import BroadcastFailure
from rpbroker.supervisor import Incarnation as BackendHandle

from .support import Workspace, child_pids, round_trip
from .test_e2e_supervision_helpers import (
    assert_envelope,
    pid_gone,
    run_cli,
    watch_events,
)

FAST = {"broadcast_ack_timeout_s": 0.5, "drain_timeout_s": 0.5}


async def start_all(broker: rpbroker.Broker, services: list[str]) -> dict[str, BackendHandle]:
    """Spawn one backend per service, all at once; return the handles by service."""

    async def one(name: str) -> None:
        async with rpbroker.connect(name, "1.0.0", broker=broker.socket_path) as stream:
            assert await round_trip(stream, name.encode()) == name.encode()

    async with trio.open_nursery() as nursery:
        for name in services:
            nursery.start_soon(one, name)
    handles = {h.key.service_name: h for h in broker.backends}
    assert sorted(handles) == sorted(services)
    return handles


def names(outcomes: Any) -> list[str]:
    return sorted(o.backend.key.service_name for o in outcomes)


async def test_broadcast_reports_acks_timeouts_and_failures_per_backend(
    workspace: Workspace,
) -> None:
    for name in ("live-a", "live-b"):
        workspace.add_service(name)
    for name in ("slow-a", "slow-b"):
        workspace.add_service(name, mode="broadcast-slow")
    workspace.add_service("failing", mode="broadcast-fail")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
            handles = await start_all(broker, ["live-a", "live-b", "slow-a", "slow-b", "failing"])
            async with watch_events(broker) as watch:
                result = await broker.broadcast(rpbroker.ReleaseHandles("/tmp"), ack_timeout_s=0.5)
            assert names(result.acks) == ["live-a", "live-b"]
            assert names(result.timeouts) == ["slow-a", "slow-b"]
            # Each slow backend had its own ACK timeout (the one given), not a share of it.
            assert [t.timeout_s for t in result.timeouts] == [0.5, 0.5]
            assert names(result.failures) == ["failing"]
            failure = result.failures[0]
            assert failure.failure is BroadcastFailure.BACKEND_ERROR
            assert "release hook failed" in failure.detail
            assert "scripted failure releasing /tmp" in failure.detail
            assert result.skipped_dead == ()
            assert result.sent_count == 5
            assert not result.all_live_backends_acked
            # One fan-out, one result event, carrying the same lists.
            [event] = watch.of(EventKind.BROADCAST_RESULT)
            assert event.details["operation"] == {"op": "release_handles", "path_prefix": "/tmp"}
            assert sorted(b["service_name"] for b in event.details["acks"]) == ["live-a", "live-b"]
            assert [t["timeout_ms"] for t in event.details["timeouts"]] == [500, 500]
            assert event.details["failures"][0]["failure"] == "backend_error"
            # Nobody was harmed: every backend still runs.
            assert all(not h.exited.is_set() for h in handles.values())
            assert not watch.of(EventKind.CRASHED)
    # Shutdown killed the slow ones after the drain timeout: nothing outlives the broker.
    assert child_pids() == set()


async def test_broadcast_reaches_every_backend_at_once(workspace: Workspace) -> None:
    # Each hook returns only once all three hooks have started, so all three can
    # ACK only if the broker sent to all of them before any answered: a fan-out
    # one backend at a time would time the first one out.
    barrier = workspace.root / "barrier"
    barrier.mkdir()
    env = {"RPB_TEST_BARRIER": str(barrier), "RPB_TEST_BARRIER_COUNT": "3"}
    services = ["barrier-a", "barrier-b", "barrier-c"]
    for name in services:
        workspace.add_service(name, mode="broadcast-barrier", env=env)
    with trio.fail_after(40):
        async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
            handles = await start_all(broker, services)
            result = await broker.broadcast(rpbroker.ReleaseHandles("/srv"), ack_timeout_s=15)
            assert names(result.acks) == services
            assert (result.timeouts, result.failures, result.skipped_dead) == ((), (), ())
            assert sorted(os.listdir(barrier)) == sorted(str(h.pid) for h in handles.values())


async def test_broadcast_skips_and_reports_a_dead_backend(workspace: Workspace) -> None:
    workspace.add_service("survivor")
    workspace.add_service("doomed")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
            handles = await start_all(broker, ["survivor", "doomed"])
            doomed = handles["doomed"]
            async with watch_events(broker) as watch:
                os.kill(doomed.pid, signal.SIGKILL)
                await watch.wait_for(EventKind.CRASHED)
                assert doomed.exited.is_set()
                result = await broker.backends.broadcast(
                    rpbroker.ReleaseHandles("/tmp"),
                    ack_timeout_s=0.5,
                    targets=[handles["survivor"], doomed],
                )
            assert [o.backend for o in result.acks] == [handles["survivor"]]
            assert [o.backend for o in result.skipped_dead] == [doomed]
            assert (result.timeouts, result.failures) == ((), ())
            assert result.sent_count == 1
            assert result.all_live_backends_acked
            [event] = watch.of(EventKind.BROADCAST_RESULT)
            assert [b["pid"] for b in event.details["skipped_dead"]] == [doomed.pid]


async def test_cli_broadcast_quiesce_drains_every_backend_out_of_the_registry(
    workspace: Workspace,
) -> None:
    workspace.add_service("one")
    workspace.add_service("two")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
            handles = await start_all(broker, ["one", "two"])
            pids = sorted(h.pid for h in handles.values())
            async with watch_events(broker) as watch:
                cli = await run_cli(
                    "broadcast", "quiesce", "--socket", broker.socket_path, "--json"
                )
                assert cli.returncode == 0, cli.stderr
                document = json.loads(cli.stdout)
                assert_envelope(document, "broadcast")
                assert document["operation"] == {"op": "quiesce", "reason": "maintenance"}
                assert sorted(b["pid"] for b in document["acks"]) == pids
                assert document["all_live_backends_acked"] is True
                assert document["timeouts"] == document["failures"] == []
                assert document["skipped_dead"] == []
                await watch.wait_for(EventKind.STOPPED, count=2)
            assert sorted(e.pid for e in watch.of(EventKind.STOPPED)) == pids
            assert sorted(e.pid for e in watch.of(EventKind.DRAINING)) == pids
            assert {e.reason for e in watch.of(EventKind.DRAINING)} == {"maintenance"}
            assert {e.details["status"] for e in watch.of(EventKind.STOPPED)} == {0}
            assert not watch.of(EventKind.CRASHED)
            assert not watch.of(EventKind.RETRYING)
            assert list(broker.backends) == []
            assert broker.status()["backends"] == []
            assert all(pid_gone(pid) for pid in pids)
            # The service is not broken, only stopped: the next Hello starts it again.
            async with rpbroker.connect("one", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"fresh") == b"fresh"
            assert next(h.pid for h in broker.backends) not in pids


async def test_cli_broadcast_release_handles_reports_timeouts_and_failures(
    workspace: Workspace,
) -> None:
    workspace.add_service("fine")
    workspace.add_service("failing", mode="broadcast-fail")
    workspace.add_service("slow", mode="broadcast-slow")
    with trio.fail_after(30):
        async with rpbroker.open_broker(workspace.config(**FAST)) as broker:
            handles = await start_all(broker, ["fine", "failing", "slow"])
            socket = broker.socket_path
            cli = await run_cli(
                "broadcast", "release-handles", "/var/data", "--socket", socket,
                "--json", "--ack-timeout", "0.3",
            )  # fmt: skip
            assert cli.returncode == 1, "timeouts or failures make the command fail"
            document = json.loads(cli.stdout)
            assert_envelope(document, "broadcast")
            assert document["operation"] == {"op": "release_handles", "path_prefix": "/var/data"}
            assert [b["pid"] for b in document["acks"]] == [handles["fine"].pid]
            [timeout] = document["timeouts"]
            assert timeout["backend"]["pid"] == handles["slow"].pid
            assert timeout["timeout_ms"] == 300, "--ack-timeout reached the broker"
            [failure] = document["failures"]
            assert failure["backend"]["pid"] == handles["failing"].pid
            assert failure["failure"] == "backend_error"
            assert "scripted failure releasing /var/data" in failure["detail"]

            text = await run_cli("broadcast", "release-handles", "/x", "--socket", socket)
            assert text.returncode == 1
            assert "sent_count: 3" in text.stdout.splitlines()


async def test_a_slow_release_hook_does_not_hold_up_a_quiesce(workspace: Workspace) -> None:
    # The backend's release hook is slow (it times out): the SDK handles each
    # broadcast in its own task, so a quiesce right behind it is acknowledged at
    # once, and the service stays usable: the quiesced backend is unroutable at
    # once and a Hello gets a fresh one, not a backend parked in draining.
    workspace.add_service("busy", mode="broadcast-slow")
    config = workspace.config(ack_deadline_s=1.0, handoff_adopt_window_s=0.5, **FAST)
    with trio.fail_after(30):
        async with rpbroker.open_broker(config) as broker:
            handles = await start_all(broker, ["busy"])
            release = await broker.broadcast(rpbroker.ReleaseHandles("/tmp"), ack_timeout_s=0.3)
            assert names(release.timeouts) == ["busy"]
            quiesce = await broker.broadcast(
                rpbroker.Quiesce(rpbroker.QuiesceReason.MAINTENANCE), ack_timeout_s=0.3
            )
            assert [o.backend for o in quiesce.acks] == [handles["busy"]]
            assert not handles["busy"].routable
            async with rpbroker.connect(
                "busy", "1.0.0", broker=broker.socket_path, hello_skip=False, timeout_s=5
            ) as stream:
                assert await round_trip(stream, b"still usable") == b"still usable"
