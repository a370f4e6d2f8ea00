"""The client cut at every step of ``connect`` on each route, against a real broker.

One real broker (``rpbroker.open_broker``) with one real echo backend process
(``scripted_backend.py`` in echo mode, which appends every byte it receives to a
file) serves the whole sweep; only the client is swept. After every cut run,
once the broker has closed its side: no descriptor of this process is left, the
broker holds no pending token or ACK, no child process was added, and no request
reached the backend twice. A run that is not cut must end with a working stream
(its request echoed back). The sweep is sampled in ``make test`` and covers every
step in ``make sweep`` (``RPBROKER_SWEEP=full``).
"""

from __future__ import annotations

import collections
import enum
import itertools
import re
from pathlib import Path

import attrs
import pytest
import trio

import rpbroker
from rpbroker.client import forget_cached_endpoints
from rpbroker.testing import (
    CountedTasks,
    SampleSteps,
    assert_sweep_clean,
    steps_from_environment,
)

from .support import PendingHandoffs, Workspace, pending_handoffs, read_exactly

pytestmark = pytest.mark.sweep

#: Sampled cut points for ``make test``. The client alone blocks fewer than ten
#: times per connect, so this is every one of its steps; counting every task
#: (the in-process broker too, about 16 steps), the first 6 then every 4th.
SAMPLED = {
    CountedTasks.TARGET_TASK: SampleSteps(every_up_to=12, stride=5),
    CountedTasks.EVERY_TASK: SampleSteps(every_up_to=6, stride=4),
}
#: Bound on one test (two sweeps): a full sweep is a few dozen runs of a few ms.
SWEEP_GUARD_S = 120
#: Hellos per second the broker admits: a sweep connects far faster than a real
#: client would, and a rate-limit refusal is not what is being tested.
HELLO_RATE_LIMIT = 1_000_000
REQUEST = re.compile(rb"<request (\d+)>")


class Payload(enum.Enum):
    #: The request rides behind the Hello (``initial_data``).
    INITIAL_DATA = "initial-data"
    #: The request is sent once ``connect`` has returned the stream.
    AFTER_CONNECT = "after-connect"


@attrs.define
class Ledger:
    """Requests the sweep sent, those answered, and what the backend received."""

    received_log: Path
    numbers: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    answered: set[int] = attrs.field(factory=set)
    routes: collections.Counter[rpbroker.Route] = attrs.field(factory=collections.Counter)

    def deliveries(self) -> collections.Counter[int]:
        data = self.received_log.read_bytes() if self.received_log.exists() else b""
        return collections.Counter(int(n) for n in REQUEST.findall(data))

    def no_request_delivered_twice(self) -> None:
        twice = sorted(n for n, times in self.deliveries().items() if times > 1)
        assert not twice, f"requests delivered more than once: {twice}"


@pytest.mark.parametrize("payload", list(Payload), ids=lambda p: p.value)
@pytest.mark.parametrize("route", list(rpbroker.Route), ids=lambda r: r.value)
async def test_connect_is_clean_wherever_it_is_cancelled(
    workspace: Workspace, route: rpbroker.Route, payload: Payload
) -> None:
    ledger = Ledger(workspace.root / "received.log")
    workspace.add_service("echo", env={"RPB_TEST_COUNTER": str(ledger.received_log)})
    config = workspace.config(hello_rate_limit=HELLO_RATE_LIMIT)
    async with rpbroker.open_broker(config) as broker:

        async def prime() -> None:
            # Before each run, outside the swept code: fill the Hello-skip cache
            # afresh, by the reconnect route (a successful handoff here would clear
            # the broker's count of failed handoffs and hide a false count).
            forget_cached_endpoints()
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, hello_skip=False, handoff=False
            ) as stream:
                assert stream.route is rpbroker.Route.RECONNECT

        async def connect_and_echo() -> None:
            number = next(ledger.numbers)
            request = b"<request %d>" % number
            async with rpbroker.connect(
                "echo",
                "1.0.0",
                broker=broker.socket_path,
                handoff=route is rpbroker.Route.HANDOFF,
                hello_skip=route is rpbroker.Route.HELLO_SKIP,
                initial_data=request if payload is Payload.INITIAL_DATA else b"",
            ) as stream:
                if payload is Payload.AFTER_CONNECT:
                    await stream.send_all(request)
                assert await read_exactly(stream, len(request)) == request
                ledger.routes[stream.route] += 1
                ledger.answered.add(number)

        def broker_holds_no_handoff() -> None:
            assert pending_handoffs(broker) == PendingHandoffs(tokens=0, acks=0)

        with trio.fail_after(SWEEP_GUARD_S):
            # The first connect starts the backend: it is part of the baseline.
            await prime()
            for counted in SAMPLED:
                report = await assert_sweep_clean(
                    connect_and_echo,
                    steps=steps_from_environment(SAMPLED[counted]),
                    counted=counted,
                    invariants=[broker_holds_no_handoff, ledger.no_request_delivered_twice],
                    allowed_errors=(rpbroker.BrokerError,),
                    prepare=prime,
                    settle=broker.wait_connections_closed,
                )
                outcomes = {kind.value: n for kind, n in report.totals().items()}
                print(
                    f"{route.value}/{payload.value}/{counted.value}:"
                    f" {report.total_steps} steps uncancelled;"
                    f" {len(report.cut_runs)} cut runs; outcomes {outcomes}"
                )
            # Clients cut mid-handoff are not the backend's failures: however many
            # there were, the handoff route is still offered.
            async with rpbroker.connect(
                "echo", "1.0.0", broker=broker.socket_path, hello_skip=False
            ) as stream:
                assert stream.route is rpbroker.Route.HANDOFF
        fallbacks = collections.Counter(
            (event.details.get("failure"), event.reason)
            for event in broker.recent_events()
            if event.kind is rpbroker.EventKind.HANDOFF_FALLBACK
        )
    print(f"  routes of answered runs { ({r.value: n for r, n in ledger.routes.items()}) }")
    print(f"  handoff fallbacks {dict(fallbacks)}")
    # Every answered request reached the backend exactly once, including after the
    # backend has exited (everything it received is in the log by then).
    deliveries = ledger.deliveries()
    assert all(deliveries[n] == 1 for n in ledger.answered)
    assert max(deliveries.values()) == 1
    assert ledger.routes[route] >= 1
