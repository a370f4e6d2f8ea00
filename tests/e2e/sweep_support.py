"""Helpers for cancellation sweeps that cut a server while a client runs outside the cut.

What this module does: ``OutsideClients`` runs one client per swept run in a
nursery of the test (so the sweep's cut never reaches it) and records how each
ended as a ``ClientEnd``; its ``all_ended`` invariant fails for a client still
running once the run has settled or one that ended in a way a client must never
end (a hang past its bound, an untyped exception). ``BrokerPhase`` and
``phase_reached`` name how far a broker got before it was stopped, from its own
event log, so a sweep can say where its cuts landed in terms of the Hello path.
``own_task_steps`` measures the steps of a target's own task, for summaries.

What it does not do: cut anything (the sweep does) or check the server side
(each test's own invariants do).
"""

from __future__ import annotations

import collections
import enum
import itertools
import re
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Unpack

import attrs
import trio

import rpbroker
from rpbroker.events import EventKind
from rpbroker.testing import CountedTasks, SampleSteps, SweepOptions, sweep_cancellation

from .support import read_exactly

#: Bound on one outside client, seconds: a connect plus one echo takes
#: milliseconds; the longest legitimate wait is a handoff fallback (the adoption
#: window plus the client's 0.5 s grace) or a broker's drain, a few seconds on a
#: loaded two-core machine. Past it the client counts as hung.
CLIENT_BOUND_S = 20.0
REQUEST = re.compile(rb"<request (\d+)>")


class ClientEnd(enum.Enum):
    """How one outside client ended."""

    #: ``connect`` returned a stream and the request came back.
    ECHOED = "echoed"
    #: ``connect`` returned a stream, which the shutting-down side then closed.
    STREAM_CLOSED = "stream-closed"
    #: A typed ``rpbroker.BrokerError``.
    TYPED_ERROR = "typed-error"
    #: Still running past ``CLIENT_BOUND_S``.
    HUNG = "hung"
    #: Anything else it raised.
    UNTYPED_ERROR = "untyped-error"


#: Ends a client may have when the server side was cut.
ACCEPTABLE_ENDS = frozenset({ClientEnd.ECHOED, ClientEnd.STREAM_CLOSED, ClientEnd.TYPED_ERROR})


@attrs.define
class ClientRecord:
    """One outside client: its request number, how it ended, and when."""

    number: int
    #: Set once the request came back (the connection is live from then on).
    echoed: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    end: ClientEnd | None = None
    error: BaseException | None = None


@attrs.define
class OutsideClients:
    """Runs one echo client per swept run, outside the cut, and records each end.

    ``nursery`` is a nursery of the test, opened around the sweep. ``received_log``
    is the file the echo backend appends every received chunk to
    (``RPB_TEST_COUNTER``), to check that no request reached it twice.
    """

    nursery: trio.Nursery
    received_log: Path | None = None
    records: list[ClientRecord] = attrs.field(factory=list)
    _numbers: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def start(
        self, connect: Callable[[bytes], Awaitable[trio.abc.Stream]], *, hold_open: bool = False
    ) -> ClientRecord:
        """Start a client: ``connect(request)`` opens its stream, then one echo.

        ``hold_open``: after the echo, keep the connection open until the other
        side ends it (a live connection for a drain).
        """
        record = ClientRecord(next(self._numbers))
        self.records.append(record)
        self.nursery.start_soon(self._run, connect, record, hold_open)
        return record

    async def _run(
        self,
        connect: Callable[[bytes], Awaitable[trio.abc.Stream]],
        record: ClientRecord,
        hold_open: bool,
    ) -> None:
        request = b"<request %d>" % record.number
        try:
            with trio.fail_after(CLIENT_BOUND_S):
                stream = await connect(request)
                async with stream:
                    try:
                        echoed = await read_exactly(stream, len(request))
                        if echoed == request:
                            record.echoed.set()
                        while hold_open and echoed == request and await stream.receive_some():
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        echoed = b""
                record.end = ClientEnd.ECHOED if echoed == request else ClientEnd.STREAM_CLOSED
        except trio.TooSlowError as exc:
            record.end, record.error = ClientEnd.HUNG, exc
        except rpbroker.BrokerError as exc:
            record.end, record.error = ClientEnd.TYPED_ERROR, exc
        except Exception as exc:
            record.end, record.error = ClientEnd.UNTYPED_ERROR, exc
        finally:
            record.done.set()

    @property
    def last(self) -> ClientRecord:
        return self.records[-1]

    async def wait_last(self) -> None:
        """Settle step: wait for the current run's client. Cancellation: stops waiting."""
        if self.records:
            await self.last.done.wait()

    def all_ended(self) -> None:
        """Invariant: every client has ended, and in an acceptable way."""
        for record in self.records:
            assert record.done.is_set(), f"client {record.number} is still running"
            assert record.end in ACCEPTABLE_ENDS, (
                f"client {record.number} ended {record.end}:\n"
                + "".join(traceback.format_exception(record.error)).rstrip()
            )

    def ends(self) -> dict[str, int]:
        return dict(collections.Counter(r.end.value for r in self.records if r.end is not None))

    def deliveries(self) -> collections.Counter[int]:
        path = self.received_log
        data = path.read_bytes() if path is not None and path.exists() else b""
        return collections.Counter(int(n) for n in REQUEST.findall(data))

    def no_request_delivered_twice(self) -> None:
        """Invariant: the backend received no request more than once."""
        twice = sorted(n for n, times in self.deliveries().items() if times > 1)
        assert not twice, f"requests delivered more than once: {twice}"


class BrokerPhase(enum.Enum):
    """How far the Hello path got before the broker began stopping (from its events)."""

    #: Never started (cut during start-up).
    NOT_STARTED = "not started"
    #: Started; no backend spawned yet (accepting, reading the Hello).
    BEFORE_SPAWN = "before the spawn (Hello read)"
    #: The spawn had begun but the backend was not ready (the Hello waiting for it).
    SPAWN_WAIT = "waiting for the spawn"
    #: The backend was ready, no handoff outcome yet: negotiating, the handoff
    #: attempt and its ACK wait, and serving the client (an SDK backend ACKs only
    #: once the client's first exchange is done).
    NEGOTIATING = "negotiating (handoff, ACK wait, serving)"
    #: A handoff outcome was recorded before the broker began stopping.
    ROUTED = "routed"


#: The phases every Hello-path sweep must have cut (``ROUTED`` comes before the
#: shutdown only when a handoff fails before the client is served).
HELLO_PATH_PHASES = frozenset(
    {
        BrokerPhase.NOT_STARTED,
        BrokerPhase.BEFORE_SPAWN,
        BrokerPhase.SPAWN_WAIT,
        BrokerPhase.NEGOTIATING,
    }
)


def phase_reached(events: list[rpbroker.LifecycleEvent]) -> BrokerPhase:
    """The ``BrokerPhase`` of a stopped broker, from its recent events."""
    kinds: list[EventKind] = []
    for event in events:
        if event.kind is EventKind.BROKER_STOPPING:
            break
        kinds.append(event.kind)
    if EventKind.BROKER_STARTED not in kinds:
        return BrokerPhase.NOT_STARTED
    if EventKind.HANDOFF_COMPLETED in kinds or EventKind.HANDOFF_FALLBACK in kinds:
        return BrokerPhase.ROUTED
    if EventKind.RUNNING in kinds:
        return BrokerPhase.NEGOTIATING
    if EventKind.SPAWNING in kinds:
        return BrokerPhase.SPAWN_WAIT
    return BrokerPhase.BEFORE_SPAWN


def describe_phases(phases: collections.Counter[BrokerPhase]) -> dict[str, int]:
    """Cut runs per phase, by the phase's name, in the phases' order."""
    return {phase.value: phases[phase] for phase in BrokerPhase if phases[phase]}


async def own_task_steps(
    target: Callable[[], Awaitable[object]], **options: Unpack[SweepOptions]
) -> int:
    """Steps the target's own task takes uncancelled (for the summary line).

    One uncut run (counting only the target's task) and one run cut at its first
    step; ``options`` as for the sweep (``prepare``, ``settle``). Cancellation:
    as ``sweep_cancellation``.
    """
    options["steps"] = SampleSteps(every_up_to=1, max_steps=1)
    options["counted"] = CountedTasks.TARGET_TASK
    report = await sweep_cancellation(target, **options)
    return report.runs[0].steps
