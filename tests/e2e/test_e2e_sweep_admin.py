"""Admin requests and operator broadcasts (``rpbroker.admin_client``) cut at every step.

One real broker with one real SDK echo backend serves the whole sweep; only the
operator's call is swept (``admin_request`` for several verbs,
``broadcast_request`` with a release-handles operation, which reaches the
backend, ``service_command`` stop and quiesce of a service with no backend, and
``read_stream`` of the events and of the echo backend's output), cut after
each of its own steps and after each step of every task (the broker serving it
too). After every run, once the broker has served the
connection: no descriptor or task is left, the broker holds no connection and
the backend's link no waiting reply, and the backend is still routable. An
uncut call returns the broker's answer; a cut one raises ``Cancelled`` or a
typed ``rpbroker.BrokerError``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio

import rpbroker
from rpbroker.admin_client import admin_request, broadcast_request, read_stream, service_command
from rpbroker.policy.broadcast import ReleaseHandles
from rpbroker.testing import CountedTasks, SampleSteps, assert_sweep_clean, steps_from_environment
from rpbroker.wire import StreamRecord
from rpbroker.wire.codes import (
    AdminVerb,
    ServiceCommand,
    ServiceCommandOutcome,
    StreamEndReason,
    StreamSource,
)

from .support import Workspace, round_trip

pytestmark = pytest.mark.sweep

#: Sampled cut points for ``make test``: a call takes 5 to 30 steps.
SAMPLED = SampleSteps(every_up_to=8, stride=5)
#: Bound on one test, s.
TEST_GUARD_S = 300

Call = Callable[[str], Awaitable[object]]


async def _status(socket_path: str) -> object:
    reply = await admin_request(socket_path, AdminVerb.STATUS, json_output=True)
    assert reply.body
    return reply


async def _broadcast(socket_path: str) -> object:
    document = await broadcast_request(socket_path, ReleaseHandles("/sweep"), ack_timeout_s=5)
    assert document, document
    return document


async def _stop_idle_service(socket_path: str) -> object:
    # A defined service with no backend: the sweep's echo backend is not touched.
    result = await service_command(socket_path, ServiceCommand.STOP, "idle", command_timeout_s=1)
    assert result.outcome is ServiceCommandOutcome.DONE, result
    return result


async def _quiesce_idle_service(socket_path: str) -> object:
    result = await service_command(socket_path, ServiceCommand.QUIESCE, "idle")
    assert result.outcome is ServiceCommandOutcome.DONE, result
    return result


async def _events(socket_path: str) -> object:
    records: list[StreamRecord] = []
    summary = await read_stream(socket_path, StreamSource.EVENTS, records.append)
    assert summary.reason is StreamEndReason.HISTORY_SENT and records, summary
    return summary


async def _logs(socket_path: str) -> object:
    summary = await read_stream(
        socket_path, StreamSource.BACKEND_OUTPUT, lambda record: None, service_name="echo"
    )
    assert summary.reason is StreamEndReason.HISTORY_SENT, summary
    return summary


CALLS: dict[str, Call] = {
    "status": _status,
    "metrics": functools.partial(admin_request, verb=AdminVerb.METRICS),
    "healthz": functools.partial(admin_request, verb=AdminVerb.HEALTHZ),
    "dump": functools.partial(admin_request, verb=AdminVerb.DUMP, json_output=True),
    "broadcast-release-handles": _broadcast,
    "service-stop": _stop_idle_service,
    "service-quiesce": _quiesce_idle_service,
    "events": _events,
    "logs": _logs,
}


@pytest.mark.parametrize(
    "counted", [CountedTasks.TARGET_TASK, CountedTasks.EVERY_TASK], ids=lambda c: c.value
)
@pytest.mark.parametrize("call", list(CALLS))
async def test_an_operator_call_is_clean_wherever_it_is_cancelled(
    workspace: Workspace, call: str, counted: CountedTasks
) -> None:
    workspace.add_service("echo")
    workspace.add_service("idle")
    async with rpbroker.open_broker(workspace.config()) as broker:
        with trio.fail_after(TEST_GUARD_S):
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"start") == b"start"
            await broker.wait_connections_closed()
            [backend] = list(broker.backends)

            def broker_holds_nothing() -> None:
                assert broker.connections_open == 0
                assert backend.link is not None and backend.link.pending_requests == 0
                assert backend.routable, "the backend left service"

            report = await assert_sweep_clean(
                CALLS[call],
                broker.socket_path,
                counted=counted,
                steps=steps_from_environment(SAMPLED),
                invariants=[broker_holds_nothing],
                allowed_errors=(rpbroker.BrokerError,),
                settle=broker.wait_connections_closed,
            )
            outcomes = {kind.value: n for kind, n in report.totals().items()}
            print(
                f"admin/{call}/{counted.value}: {report.total_steps} steps uncancelled; "
                f"{len(report.cut_runs)} cut runs; outcomes {outcomes}"
            )
            # The backend still serves, and still answers broadcasts.
            result = await broker.broadcast(ReleaseHandles("/after"))
            assert result.to_json()
            async with rpbroker.connect("echo", "1.0.0", broker=broker.socket_path) as stream:
                assert await round_trip(stream, b"after") == b"after"
