"""The backend SDK (``serve_backend``) cut at every step of each thing it answers.

Each run is one in-process ``serve_backend`` on a real control socketpair
(``transports.open_control_pair``: real ``SCM_RIGHTS`` passing) and a real
endpoint, against a broker side run by the test outside the cut, through the
broker's own ``BackendLink``: it waits for the SDK's ready message and then
makes one request: a handoff offer the SDK adopts (handoff-ready EVENT to the
client, an echo, then the HandoffAck), an endpoint probe on the reconnect
endpoint (a raw ``rpbroker.wire.probe`` client), a release-handles broadcast
answered by a hook, or a quiesce with a live connection (the SDK drains it and
returns by itself). Otherwise the broker side closes the link, and the SDK returns.

The sweep cuts the SDK's scope after every step of its tasks, and again after
every step of any task (the broker side's too). After every run:
the broker side ended, either with its request answered or because the SDK went
away (the link closed, the connection ended): never hung, never an untyped
error; the SDK removed its endpoint file; no descriptor or task is left.
"""

from __future__ import annotations

import enum
import os
import time
from pathlib import Path

import attrs
import pytest
import trio
import trio.lowlevel

import transports
from rpbroker import control
from rpbroker.backend import serve_backend
from rpbroker.client import is_handoff_ready_event
from rpbroker.launcher import ENV_ENDPOINT, ENV_INSTANCE, ENV_SERVICE_NAME, ENV_SERVICE_VERSION
from rpbroker.policy.broadcast import Quiesce, QuiesceReason, ReleaseHandles
from rpbroker.policy.tokens import HandoffToken
from rpbroker.supervisor.link import BackendLink, LinkClosedError
from rpbroker.testing import CountedTasks, SampleSteps, assert_sweep_clean, steps_from_environment
from rpbroker.wire.framing import MAX_FRAME_BYTES, FramingError, read_frame_body
from rpbroker.wire.probe import PROBE_NONCE_BYTES, parse_probe_reply, probe_request_frame

from .support import Workspace, read_exactly
from .sweep_support import own_task_steps

pytestmark = pytest.mark.sweep

#: Sampled cut points for ``make test``: one request takes 15 to 40 steps of the
#: SDK's tasks.
SAMPLED = SampleSteps(every_up_to=6, stride=5)
#: Bound on the broker side of one run, s: each request is answered in
#: milliseconds; past it the broker side counts as hung.
BROKER_SIDE_BOUND_S = 10.0
#: The quiesce's drain deadline, ms: long enough that the live connection
#: finishes first (the SDK then returns at once, not at the deadline).
QUIESCE_DRAIN_MS = 5_000
#: Bound on one test, s.
TEST_GUARD_S = 600


class Request(enum.Enum):
    """What the broker side asks of the SDK in each run."""

    ADOPT_OFFER = "adopt-offer"
    PROBE = "probe"
    RELEASE_HANDLES = "release-handles"
    QUIESCE = "quiesce"


class BrokerSideEnd(enum.Enum):
    """How the broker side of one run ended."""

    ANSWERED = "answered"
    SDK_GONE = "sdk-gone"
    HUNG = "hung"
    FAILED = "failed"


class SdkGone(Exception):
    """The SDK went away during the request (its connection or link ended)."""


_GONE = (
    SdkGone,
    LinkClosedError,
    transports.TransportError,
    FramingError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


async def echo(stream: trio.abc.Stream) -> None:
    """The SDK's handler. Cancellation: returns (the SDK closes the stream)."""
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def exchange(stream: trio.abc.Stream, payload: bytes) -> None:
    """One echo round trip; ``SdkGone`` if the connection ends first."""
    await stream.send_all(payload)
    echoed = await read_exactly(stream, len(payload))
    if len(echoed) < len(payload):
        raise SdkGone("the connection ended before the echo")
    assert echoed == payload


@attrs.define(eq=False)
class Observer:
    """The broker side's ``LinkObserver``: readiness and the link's end."""

    changed: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)
    ready: bool = False

    def link_ready(self, notice: control.ReadyNotice) -> None:
        self.ready = True
        self.changed.set()

    def link_activity(self, notice: control.ActivityNotice) -> None:
        pass

    def link_closed(self, reason: str) -> None:
        self.closed.set()
        self.changed.set()


@attrs.define(eq=False)
class SdkRun:
    """One run: the SDK's environment and the broker side's link and result."""

    request: Request
    endpoint: str
    environ: dict[str, str]
    inherited_fd: int
    inherited_inode: int
    link: BackendLink
    observer: Observer
    hook_calls: list[str]
    #: Set by the swept target when it starts (before that, nothing to wait for).
    sdk_started: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    end: BrokerSideEnd | None = None
    error: BaseException | None = None

    def close_unadopted(self) -> None:
        """Close the inherited descriptor if the SDK was cut before adopting it."""
        try:
            inode = os.fstat(self.inherited_fd).st_ino
        except OSError:
            return  # adopted and closed by the SDK
        if inode == self.inherited_inode:
            os.close(self.inherited_fd)

    async def broker_side(self) -> None:
        """Make the run's request, then close the link (unless the SDK ends itself).

        Cancellation: not cut by the sweep (it runs in the test's nursery).
        """
        try:
            with trio.fail_after(BROKER_SIDE_BOUND_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.link.run)
                    await self.observer.changed.wait()
                    if not self.observer.ready:
                        raise SdkGone("the link closed before the SDK was ready")
                    await self._ask()
                    if self.request is Request.QUIESCE:
                        # The SDK drained and returns by itself: its link closes.
                        await self.observer.closed.wait()
                    await self.link.aclose()
            self.end = BrokerSideEnd.ANSWERED
        except trio.TooSlowError as exc:
            self.end, self.error = BrokerSideEnd.HUNG, exc
        except BaseExceptionGroup as group:
            gone, rest = group.split(_GONE)
            self.end = BrokerSideEnd.FAILED if rest is not None else BrokerSideEnd.SDK_GONE
            self.error = rest if rest is not None else gone
        except _GONE as exc:
            self.end, self.error = BrokerSideEnd.SDK_GONE, exc
        except Exception as exc:
            self.end, self.error = BrokerSideEnd.FAILED, exc
        finally:
            with trio.CancelScope(shield=True):
                await self.link.aclose()
            self.done.set()

    async def _ask(self) -> None:
        match self.request:
            case Request.ADOPT_OFFER:
                await self._offer()
            case Request.PROBE:
                await self._probe()
            case Request.RELEASE_HANDLES:
                reply = await self.link.broadcast(
                    ReleaseHandles("/sweep"), drain_deadline_ms=0, ack_timeout_ms=5_000
                )
                assert reply.failure is None, reply
                assert self.hook_calls == ["/sweep"]
            case Request.QUIESCE:
                client = await transports.connect(self.endpoint)
                async with client:
                    await exchange(client, b"before")
                    reply = await self.link.broadcast(
                        Quiesce(QuiesceReason.MAINTENANCE),
                        drain_deadline_ms=QUIESCE_DRAIN_MS,
                        ack_timeout_ms=5_000,
                    )
                    assert reply.failure is None, reply
                    # The live connection is still served during the drain.
                    await exchange(client, b"draining")

    async def _offer(self) -> None:
        token = HandoffToken.generate()
        correlation_id = 7
        a, b = trio.socket.socketpair()
        client, connection = trio.SocketStream(a), trio.SocketStream(b)
        async with client:
            with self.link.expect_handoff(correlation_id) as slot:

                def offer(receipt: transports.PassReceipt) -> bytes:
                    return control.handoff_offer(
                        token=token.raw,
                        service_name="svc",
                        correlation_id=correlation_id,
                        deadline_unix_ms=int((time.time() + 5) * 1000),
                        handle_value=receipt.handle_value,
                    )

                async with connection:
                    await self.link.pass_connection(connection, token.raw, offer, preface=b"")
                event = await read_frame_body(client, MAX_FRAME_BYTES)
                assert is_handoff_ready_event(event, token.raw)
                await exchange(client, b"adopted")
                reply = await slot.wait()
                assert reply.accepted and reply.token == token.raw, reply

    async def _probe(self) -> None:
        nonce = os.urandom(PROBE_NONCE_BYTES)
        stream = await transports.connect(self.endpoint)
        async with stream:
            await stream.send_all(probe_request_frame(nonce))
            body = await read_frame_body(stream, MAX_FRAME_BYTES)
            identity = parse_probe_reply(body, nonce)
            assert identity.pid == os.getpid()
            assert identity.ipc_endpoint.path == self.endpoint


@pytest.mark.parametrize(
    "counted", [CountedTasks.WHOLE_RUN, CountedTasks.EVERY_TASK], ids=lambda c: c.value
)
@pytest.mark.parametrize("request_kind", list(Request), ids=lambda r: r.value)
async def test_the_sdk_is_clean_wherever_it_is_cancelled(
    workspace: Workspace, request_kind: Request, counted: CountedTasks
) -> None:
    runs: list[SdkRun] = []

    async with trio.open_nursery() as outside:

        async def new_run() -> None:
            """Before each run: a fresh control pair and endpoint, the broker side started.

            Cancellation: not cut (the sweep's own preparation).
            """
            channel, child = transports.open_control_pair()
            inherited = os.dup(child.fileno())
            child.close()
            endpoint = transports.new_backend_endpoint(workspace.runtime)
            observer = Observer()
            hook_calls: list[str] = []
            run = SdkRun(
                request=request_kind,
                endpoint=endpoint,
                environ={
                    transports.CONTROL_CHANNEL_ENV: f"fd:{inherited}",
                    ENV_ENDPOINT: endpoint,
                    ENV_SERVICE_NAME: "svc",
                    ENV_SERVICE_VERSION: "1.0.0",
                    ENV_INSTANCE: "sweep",
                },
                inherited_fd=inherited,
                inherited_inode=os.fstat(inherited).st_ino,
                link=BackendLink(channel, observer),
                observer=observer,
                hook_calls=hook_calls,
            )
            runs.append(run)
            outside.start_soon(run.broker_side)
            await trio.lowlevel.checkpoint()

        async def sdk() -> None:
            run = runs[-1]

            async def release(prefix: str) -> None:
                run.hook_calls.append(prefix)
                await trio.lowlevel.checkpoint()

            run.sdk_started = True
            try:
                await serve_backend(echo, on_release_handles=release, environ=run.environ)
            finally:
                run.close_unadopted()

        async def broker_side_done() -> None:
            """Settle: the broker side of a run that started. Cancellation: stops waiting."""
            if runs and runs[-1].sdk_started:
                await runs[-1].done.wait()

        def broker_side_ended_cleanly() -> None:
            run = runs[-1]
            assert run.done.is_set(), "the broker side is still waiting"
            assert run.end in (BrokerSideEnd.ANSWERED, BrokerSideEnd.SDK_GONE), (
                f"the broker side ended {run.end}: {run.error!r}"
            )

        def endpoint_removed() -> None:
            assert not Path(runs[-1].endpoint).exists(), "the SDK left its endpoint file"

        with trio.fail_after(TEST_GUARD_S):
            report = await assert_sweep_clean(
                sdk,
                counted=counted,
                steps=steps_from_environment(SAMPLED),
                invariants=[broker_side_ended_cleanly, endpoint_removed],
                prepare=new_run,
                settle=broker_side_done,
            )
            ends = [run.end for run in runs]
            own = await own_task_steps(
                sdk,
                invariants=[broker_side_ended_cleanly, endpoint_removed],
                prepare=new_run,
                settle=broker_side_done,
            )
    print(
        f"sdk/{request_kind.value}: {own} steps uncancelled (own task), "
        f"{report.total_steps} ({counted.value}); "
        f"{len(report.cut_runs)} cut runs; broker side "
        f"{ {e.value: ends.count(e) for e in BrokerSideEnd if e in ends} }"
    )
    # The uncut runs (the warm-up and the last) answered the request.
    assert ends[0] is BrokerSideEnd.ANSWERED, runs[0].error
    assert ends[-1] is BrokerSideEnd.ANSWERED, runs[-1].error
