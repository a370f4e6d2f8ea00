"""Fake backends: the real backend SDK core, run in-process with scripted behaviour."""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable
from typing import TypeAlias

import attrs
import trio

import transports
from rpbroker import control
from rpbroker.backend import BackendContext, Handler, ReleaseHook, _Backend
from rpbroker.launcher import LaunchRequest
from rpbroker.policy.broadcast import (
    BroadcastFailure,
    BroadcastOperation,
    Quiesce,
)

from ._channel import MemoryControlChannel
from ._process import FakeProcess

logger = logging.getLogger("rpbroker.testing")


class ScriptedResponse(enum.Enum):
    """A broadcast response of a fake: acknowledge, or never answer."""

    ACK = "ack"
    TIMEOUT = "timeout"


class Dies(enum.Enum):
    """A broadcast response: the process exits (``exit_status``) when the command arrives."""

    DEAD = "dead"


#: Answer every broadcast with an ACK.
ACK = ScriptedResponse.ACK
#: Never answer a broadcast (the broker records a timeout); keep running.
TIMEOUT = ScriptedResponse.TIMEOUT
#: Exit when a broadcast arrives, without answering (the broker reports it dead).
DEAD = Dies.DEAD

#: How a fake answers broadcasts: ``ACK``, ``TIMEOUT``, ``DEAD`` or a
#: ``BroadcastFailure`` (answered as that failure, with its default detail).
BroadcastResponse: TypeAlias = ScriptedResponse | BroadcastFailure | Dies


class HandoffBehaviour(enum.Enum):
    """What a fake does with a handed-off connection."""

    #: Exactly what the SDK does: check the offer, confirm to the client, serve, ACK.
    ADOPT = "adopt"
    #: Refuse: tell the client (it falls back at once), close, ACK ``accepted=False``.
    REJECT = "reject"
    #: Keep the connection, tell nobody: the broker's ACK deadline and the client's
    #: handoff-ready timeout decide.
    NEVER_ACK = "never-ack"
    #: Exit with ``exit_status`` as soon as an offer arrives.
    CRASH = "crash"


async def echo_handler(stream: trio.abc.Stream) -> None:
    """The default connection handler: send back every byte until end-of-stream.

    A peer that resets the connection just ends it. Cancellation: returns at once
    (the SDK closes the stream).
    """
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@attrs.frozen(kw_only=True)
class FakeBackendScript:
    """How one fake backend behaves. Every launch of a service uses its current script.

    ``broadcast``: the answer to every lifecycle broadcast (see ``BroadcastResponse``).
    ``exit_on_quiesce``: after ACKing a quiesce, stop accepting, drain (bounded by
    the command's drain deadline, else ``drain_timeout_s``) and exit 0, like the
    SDK; false keeps it running (a backend that ignores quiesce).
    ``exit_before_ready``: exit with ``exit_status`` instead of becoming ready.
    ``ready_delay_s``: ``trio.sleep`` before reporting ready (``math.inf``: never).
    ``handoff``: see ``HandoffBehaviour``. ``handler`` serves every connection
    (both routes). ``on_release_handles``: the SDK's release hook.
    ``listen``: bind ``request.endpoint`` (the reconnect route); false saves a
    socket per fake (for thousands of fakes) but reconnecting clients then fail.
    ``spawn_error``: make ``launch`` raise ``transports.SpawnError(spawn_error)``.
    ``exit_on_terminate``: SIGTERM ends the process (status -15); false ignores it
    (only SIGKILL ends it then).
    ``exit_status``: the status of the exits above (and of ``DEAD``/``CRASH``).
    """

    broadcast: BroadcastResponse = ACK
    exit_on_quiesce: bool = True
    exit_before_ready: bool = False
    ready_delay_s: float = 0.0
    handoff: HandoffBehaviour = HandoffBehaviour.ADOPT
    handler: Handler = echo_handler
    on_release_handles: ReleaseHook | None = None
    drain_timeout_s: float = 10.0
    listen: bool = True
    spawn_error: str | None = None
    exit_on_terminate: bool = True
    exit_status: int = 1


class _NoListener:
    """A listener that never yields a connection (``FakeBackendScript(listen=False)``)."""

    def __init__(self, path: str) -> None:
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    async def accept(self) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _ScriptedSdk(_Backend):
    """The SDK's backend core with the fake's script applied to offers and broadcasts."""

    def __init__(self, fake: FakeBackend, listener: transports.Listener) -> None:
        script = fake.script
        super().__init__(
            fake.context,
            _counting_handler(fake, script.handler),
            fake.channel,
            listener,
            script.on_release_handles,
            script.drain_timeout_s,
        )
        self._fake = fake

    async def _on_offer(
        self, notice: control.OfferNotice, passed: transports.PassedConnection | None
    ) -> None:
        fake = self._fake
        fake.offers_received += 1
        behaviour = fake.script.handoff
        offer = notice.offer
        token = bytes(offer.token)
        if behaviour is HandoffBehaviour.ADOPT:
            await super()._on_offer(notice, passed)
            if token in self._consumed:
                fake.handoffs_adopted += 1
            return
        if behaviour is HandoffBehaviour.CRASH or behaviour is HandoffBehaviour.NEVER_ACK:
            if passed is not None:
                # Held until the fake ends (the offer task must not close it).
                fake._held.append(passed.stream)
                self._adopted.add(passed.stream)
            if behaviour is HandoffBehaviour.CRASH:
                fake.process.exit(fake.script.exit_status)
            await trio.lowlevel.checkpoint()
            return
        assert behaviour is HandoffBehaviour.REJECT
        fake.handoffs_rejected += 1
        await self._refuse(notice, passed, "rpbroker.testing fake backend refuses handoffs")

    async def _on_broadcast(self, notice: control.BroadcastNotice, done: trio.CancelScope) -> None:
        fake = self._fake
        fake.received_operations.append(notice.operation)
        response = fake.script.broadcast
        if response is ScriptedResponse.ACK:
            if isinstance(notice.operation, Quiesce) and not fake.script.exit_on_quiesce:
                await self.channel.send_message(control.broadcast_reply(notice.operation_id, None))
                return
            await super()._on_broadcast(notice, done)
            return
        if response is ScriptedResponse.TIMEOUT:
            await trio.lowlevel.checkpoint()
            return
        if response is Dies.DEAD:
            fake.process.exit(fake.script.exit_status)
            await trio.lowlevel.checkpoint()
            return
        assert isinstance(response, BroadcastFailure)
        await self.channel.send_message(
            control.broadcast_reply(notice.operation_id, response, response.default_detail)
        )


def _counting_handler(fake: FakeBackend, handler: Handler) -> Handler:
    async def counted(stream: trio.abc.Stream) -> None:
        fake.connections_served += 1
        await handler(stream)

    return counted


class FakeBackend:
    """One fake backend incarnation: what a single ``FakeLauncher.launch`` produced.

    Read ``process`` (a ``FakeProcess``), ``received_operations`` (every broadcast
    operation that reached it, in order), ``offers_received``,
    ``handoffs_adopted``, ``handoffs_rejected``, ``connections_served`` and
    ``held_streams``;
    ``ready_at`` is the ``trio.current_time()`` at which it reported ready.
    ``crash(status)`` simulates an unexpected exit.
    """

    def __init__(
        self,
        request: LaunchRequest,
        script: FakeBackendScript,
        process: FakeProcess,
        channel: MemoryControlChannel,
        on_change: Callable[[], None],
    ) -> None:
        self.request = request
        self.script = script
        self.process = process
        self.channel = channel
        self.context = BackendContext(
            service_name=request.service_name,
            service_version=request.service_version,
            endpoint=request.endpoint,
            instance=request.instance,
        )
        self.received_operations: list[BroadcastOperation] = []
        self.offers_received = 0
        self.handoffs_adopted = 0
        self.handoffs_rejected = 0
        self.connections_served = 0
        self.ready_at: float | None = None
        self._ready = trio.Event()
        self._finished = trio.Event()
        self._held: list[trio.abc.Stream] = []
        # Like a real process, a fake ends only by exiting: it is shielded from the
        # cancellation of the test's scopes, and its exit cancels this scope.
        self._scope = trio.CancelScope(shield=True)
        self._on_change = on_change
        process.on_exit(self._scope.cancel)
        process.on_exit(on_change)
        channel.on_send = self._watch_sent

    def __repr__(self) -> str:
        return (
            f"<FakeBackend {self.service_name} {self.service_version} pid={self.pid} "
            f"returncode={self.process.returncode}>"
        )

    @property
    def service_name(self) -> str:
        return self.request.service_name

    @property
    def service_version(self) -> str:
        return self.request.service_version

    @property
    def endpoint(self) -> str:
        return self.request.endpoint

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def held_streams(self) -> tuple[trio.abc.Stream, ...]:
        """Handed-off connections a ``NEVER_ACK`` or ``CRASH`` fake keeps until it ends."""
        return tuple(self._held)

    def crash(self, status: int = 1) -> None:
        """Make the process exit now with ``status``, as a crash would."""
        self.process.exit(status)

    async def wait_ready(self) -> None:
        """Wait until the fake reported ready. Cancellation: just stops waiting."""
        await self._ready.wait()

    async def wait_exited(self) -> int:
        """Wait until the process exited and return its status. Cancellation: stops waiting."""
        return await self.process.wait()

    async def wait_finished(self) -> None:
        """Wait until the fake's task has ended and released everything it held.

        Cancellation: just stops waiting.
        """
        await self._finished.wait()

    def _watch_sent(self, framed: bytes) -> None:
        """Note readiness the moment the ready message leaves (before the broker sees it)."""
        if self._ready.is_set():
            return
        with contextlib.suppress(control.ControlMessageError):
            if isinstance(control.parse(framed), control.ReadyNotice):
                self.ready_at = trio.current_time()
                self._ready.set()
                self._on_change()

    async def run(self) -> None:
        """The fake's whole life; run by the launcher's nursery.

        Ends when the process exits (crash, kill, or the fake's own exit). The
        process exits 0 when the SDK core returns (quiesce done, or the broker
        closed the channel).

        Cancellation: like a real process, a fake ignores the cancellation of the
        scopes around it (its body is shielded); only ``process`` exiting ends it.
        Its endpoint, channel and held connections are always closed on the way out.
        """
        status = 0
        listener: transports.Listener | None = None
        try:
            with self._scope:
                if self.script.exit_before_ready:
                    await trio.lowlevel.checkpoint()
                    status = self.script.exit_status
                    return
                if self.script.listen:
                    listener = await transports.open_listener(self.endpoint)
                else:
                    listener = _NoListener(self.endpoint)
                if self.script.ready_delay_s > 0:
                    await trio.sleep(self.script.ready_delay_s)
                await _ScriptedSdk(self, listener).run(trio.TASK_STATUS_IGNORED)
        except Exception:
            logger.exception("fake backend %s failed", self)
            status = self.script.exit_status
        finally:
            with trio.CancelScope(shield=True):
                for stream in self._held:
                    await stream.aclose()
                self._held.clear()
                if listener is not None:
                    await listener.aclose()
                await self.channel.aclose()
            self.process.exit(status)
            self._finished.set()
            self._on_change()
