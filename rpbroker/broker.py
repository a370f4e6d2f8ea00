"""The broker: accept loop, the Hello path, admin dispatch, graceful shutdown.

What this module does: binds the broker endpoint and serves every connection in
its own task (nothing a peer sends can stop the accept loop). For each one it
checks the kernel's peer identity before reading, reads exactly one frame under
an absolute deadline, and routes it: admin (``0xAD01``), lifecycle broadcast
requests from operators (rpbroker's lane), or a Hello, which goes through shape
validation, the per-peer rate limit, the service definition (re-read on every
Hello), the version policy, the backend supervisor (find or spawn) and finally a
``Negotiated`` or ``Refused`` reply echoing ``request_id`` and the trace context,
followed by a handoff attempt when both sides want one. It also owns graceful
shutdown and the embedding API (``open_broker``, ``serve_broker``).

What it does not do: policy arithmetic (``rpbroker.policy``), process and
control-channel management (``rpbroker.backends``), the handoff attempt itself
(``rpbroker.handoff``), verb rendering (``rpbroker.admin``), or anything platform
specific (``transports``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

import transports
from rpbroker import admin, control
from rpbroker._scopes import cancel_when_set
from rpbroker.backends import BackendHandle, BackendKey, BackendSupervisor
from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog, LifecycleEvent
from rpbroker.handoff import HandoffCoordinator, HandoffFellBack
from rpbroker.launcher import BackendLauncher
from rpbroker.metrics import BrokerMetrics
from rpbroker.policy.broadcast import BroadcastOperation, BroadcastResult
from rpbroker.policy.fallback import Attempt
from rpbroker.policy.fd_pressure import (
    FD_PRESSURE_ACCEPT_BACKOFF_S,
    AcceptErrorKind,
    FdPressureGuard,
)
from rpbroker.policy.hello import (
    HelloRateLimiter,
    Refusal,
    VersionPolicy,
    check_hello_shape,
    negotiated_keepalive,
)
from rpbroker.services import (
    InvalidServiceName,
    ServiceCatalog,
    ServiceLoadError,
    ServiceNotFound,
    ServiceSpec,
)
from rpbroker.wire import Frame, Hello, HelloReply, Negotiated, Refused
from rpbroker.wire._pb.broker_v1_pb2 import ErrorCode
from rpbroker.wire.codes import PROTOCOL_VERSION, Capability, FrameKind, RefusalCode
from rpbroker.wire.frames import (
    EnvelopeFault,
    MalformedMessage,
    check_envelope,
    decode,
    decode_frame,
    encode,
    framed,
    response_to,
)
from rpbroker.wire.framing import (
    MAX_HELLO_BYTES,
    BadFramingByte,
    FrameTooLarge,
    FramingError,
    read_frame_body,
)
from rpbroker.wire.protocols import PayloadProtocol

logger = logging.getLogger("rpbroker.broker")

#: Bound on writing a reply or refusal to a client, seconds. Replies are small and
#: the client is waiting for them; this only trips for a peer that stopped reading.
REPLY_WRITE_TIMEOUT_S = 5.0
#: retry_after for a Hello refused because its backend was not ready in time, ms.
NOT_READY_RETRY_AFTER_MS = 1000

_ENVELOPE_REFUSALS = {
    EnvelopeFault.VERSION: (RefusalCode.VERSION_UNSUPPORTED, "frame envelope_version is not v1"),
    EnvelopeFault.KIND: (RefusalCode.PEER_REJECTED, "Hello frame kind must be REQUEST"),
    EnvelopeFault.PROTOCOL: (
        RefusalCode.PEER_REJECTED,
        "Hello frame payload_protocol must be control-plane",
    ),
    EnvelopeFault.ENCODING: (RefusalCode.PEER_REJECTED, "Hello payload must not be compressed"),
}


def refusal_reply(refusal: Refusal) -> bytes:
    """Encode a ``HelloReply{refused}`` payload for ``refusal``."""
    refused = Refused(
        reason=refusal.reason,
        daemon_min_protocol=PROTOCOL_VERSION,
        daemon_max_protocol=PROTOCOL_VERSION,
        code=ErrorCode.ValueType(refusal.code),
        retry_after_ms=refusal.retry_after_ms or 0,
    )
    return encode(HelloReply(refused=refused))


class Broker:
    """A running broker. Create it with ``open_broker`` or ``serve_broker``.

    The methods are safe to call from any task of the broker's trio run.
    """

    def __init__(self, config: BrokerConfig, *, launcher: BackendLauncher | None = None) -> None:
        self.config = config
        self.events = EventLog(config.event_log_size)
        self.metrics = BrokerMetrics()
        self.backends = BackendSupervisor(
            config,
            self.events,
            launcher,
            on_spawn=lambda key, outcome: self.metrics.spawn(
                key.service_name, key.service_version, outcome.value
            ),
        )
        self.handoff = HandoffCoordinator(config, self.events)
        self.fd_guard = FdPressureGuard()
        self._catalog = ServiceCatalog(config.services_dir)
        self._rate_limiter = HelloRateLimiter(config.hello_rate_limit, config.hello_rate_window_s)
        self._connection_ids = itertools.count(1)
        self._user = transports.current_user()
        self.socket_path = config.socket_path or transports.broker_endpoint(
            "shared", directory=config.runtime_dir
        )
        self.started_at = time.time()
        self.connections_open = 0
        self._no_connections = trio.Event()
        self._no_connections.set()
        self._accepting = False
        self._stop_requested = trio.Event()
        self._stopping = trio.Event()
        self._stopped = trio.Event()
        self._drain_timeout_s = config.drain_timeout_s
        self._nursery: trio.Nursery | None = None
        #: The graceful stop's scope while it runs; ``force_stop`` cancels it.
        self._graceful_scope = trio.CancelScope(shield=True)

    # -- public API ---------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """True while the broker accepts Hellos (false once shutdown began)."""
        return self._accepting

    def request_shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Start a graceful shutdown and return at once (see ``shutdown``)."""
        if drain_timeout_s is not None:
            self._drain_timeout_s = drain_timeout_s
        self._stop_requested.set()

    def force_stop(self) -> None:
        """Stop at once: skip or cut short the graceful drain and kill every backend.

        Returns at once; ``wait_stopped`` tells when the broker has stopped (socket
        closed and removed, backends killed and reaped). Safe to call at any time,
        also during a graceful shutdown, and more than once.
        """
        self._stop_requested.set()
        self._graceful_scope.cancel()

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Shut down gracefully and wait until the broker has stopped.

        Stops accepting, refuses unfinished Hellos with SHUTTING_DOWN, quiesces
        every backend, lets them drain for up to ``drain_timeout_s`` (default from
        the config) and kills what is left; removes the socket file.

        Cancellation: cancelling the wait does not undo the shutdown.
        """
        self.request_shutdown(drain_timeout_s)
        await self._stopped.wait()

    async def broadcast(
        self, operation: BroadcastOperation, *, ack_timeout_s: float | None = None
    ) -> BroadcastResult:
        """Send a lifecycle operation to every live backend; see ``BackendSupervisor.broadcast``."""
        return await self.backends.broadcast(operation, ack_timeout_s=ack_timeout_s)

    async def wait_stopped(self) -> None:
        """Wait until the broker has stopped (after a shutdown by any means)."""
        await self._stopped.wait()

    async def wait_connections_closed(self) -> None:
        """Wait until no client connection is being served by the broker itself.

        Routed connections (handed off or reconnected) belong to backends and do
        not count. Cancellation: just stops waiting.
        """
        await self._no_connections.wait()

    def status(self) -> dict[str, Any]:
        """The admin STATUS document (JSON-ready)."""
        return admin.status_document(self)

    def iter_events(self) -> AsyncIterator[LifecycleEvent]:
        """Every lifecycle event from now on, as an async iterator."""
        return self.events.subscribe()

    def recent_events(self) -> list[LifecycleEvent]:
        return self.events.recent()

    # -- serving --------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report ready through ``task_status``, and serve until shut down.

        Cancellation: cancelling the scope that runs ``serve`` performs the same
        graceful shutdown (shielded, bounded by the drain timeout), then kills any
        backend still alive; no descriptor, task or child process is left.
        """
        listener = await transports.open_listener(self.socket_path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await nursery.start(self.backends.run)
                    if self.config.idle_check_enabled:
                        await nursery.start(self.backends.quiesce_idle)
                    nursery.start_soon(self._accept_loop, listener)
                    self._accepting = True
                    self.events.emit(EventKind.BROKER_STARTED, socket=self.socket_path)
                    task_status.started(self)
                    try:
                        await self._stop_requested.wait()
                    finally:
                        with (
                            self._graceful_scope,
                            trio.move_on_after(self._drain_timeout_s + REPLY_WRITE_TIMEOUT_S),
                        ):
                            await self._graceful_stop(listener)
                finally:
                    # The supervisor shields its backends until now (see its ``run``).
                    self.backends.close()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self._accepting = False
                await listener.aclose()
                self.events.emit(EventKind.BROKER_STOPPED)
                self.events.close()
                self._stopped.set()

    async def _graceful_stop(self, listener: transports.Listener) -> None:
        self._accepting = False
        self._stopping.set()
        self.events.emit(
            EventKind.BROKER_STOPPING, drain_timeout_ms=int(self._drain_timeout_s * 1000)
        )
        await listener.aclose()
        await self.backends.stop_all(self._drain_timeout_s)

    async def _accept_loop(self, listener: transports.Listener) -> None:
        assert self._nursery is not None
        while True:
            try:
                stream = await listener.accept()
            except transports.FdExhaustedError:
                action = self.fd_guard.on_accept_error(AcceptErrorKind.FD_EXHAUSTED)
                if action.first_demotion:
                    self.events.emit(
                        EventKind.FD_PRESSURE, reason="accept failed: out of descriptors"
                    )
                await trio.sleep(FD_PRESSURE_ACCEPT_BACKOFF_S)
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            was_demoted = self.fd_guard.demoted
            self.fd_guard.on_accept_ok()
            if was_demoted and not self.fd_guard.demoted:
                self.events.emit(EventKind.FD_PRESSURE_CLEARED)
            self._nursery.start_soon(self._serve_connection, stream, trio.current_time())

    # -- one connection ------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.abc.Stream, accepted_at: float) -> None:
        self.connections_open += 1
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        try:
            try:
                peer = transports.peer_identity(stream)
            except transports.TransportError as exc:
                self.events.emit(EventKind.PEER_DROPPED, reason=f"peer identity unavailable: {exc}")
                return
            if peer.user != self._user:
                self.events.emit(
                    EventKind.PEER_DROPPED,
                    pid=peer.pid,
                    reason="credential policy refused a peer of another user",
                    peer_user=peer.user,
                )
                return
            with trio.CancelScope(deadline=accepted_at + self.config.hello_timeout_s) as scope:
                first = await self._read_first_frame(stream)
            if scope.cancelled_caught:
                self.events.emit(
                    EventKind.PEER_DROPPED,
                    pid=peer.pid,
                    reason="no complete frame before the deadline",
                )
                return
            if first is None:
                return
            if isinstance(first, Refusal):
                await self._send(
                    stream, response_frame(None, PayloadProtocol.CONTROL, refusal_reply(first))
                )
                self._refused(first, peer.pid)
                return
            if first.payload_protocol == PayloadProtocol.ADMIN:
                reply = await admin.handle_admin_frame(self, first)
                if reply is not None:
                    await self._send(stream, reply)
                return
            if first.payload_protocol == PayloadProtocol.LIFECYCLE:
                reply = await admin.handle_lifecycle_frame(self, first)
                if reply is not None:
                    await self._send(stream, reply)
                return
            await self._hello(stream, first, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.debug("connection ended: %s", exc)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.connections_open -= 1
            if self.connections_open == 0:
                self._no_connections.set()

    async def _read_first_frame(self, stream: trio.abc.Stream) -> Frame | Refusal | None:
        try:
            body = await read_frame_body(stream, MAX_HELLO_BYTES)
        except BadFramingByte:
            return Refusal(RefusalCode.VERSION_UNSUPPORTED, "unsupported framing version")
        except FrameTooLarge:
            return Refusal(RefusalCode.PEER_REJECTED, "initial Hello frame exceeds 64 KiB")
        except FramingError:
            return Refusal(RefusalCode.PEER_REJECTED, "incomplete Hello frame")
        except (trio.BrokenResourceError, OSError):
            return None
        try:
            return decode_frame(body)
        except MalformedMessage:
            return Refusal(RefusalCode.PEER_REJECTED, "malformed broker Frame")

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> bool:
        with trio.move_on_after(REPLY_WRITE_TIMEOUT_S):
            try:
                await stream.send_all(data)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
        return False

    def _refused(self, refusal: Refusal, pid: int, service: str = "", version: str = "") -> None:
        self.metrics.hello(service, version, "refused")
        self.events.emit(
            EventKind.HELLO_REFUSED,
            service_name=service,
            service_version=version,
            pid=pid,
            reason=refusal.reason,
            code=refusal.code.name,
        )

    async def _refuse(
        self,
        stream: trio.abc.Stream,
        frame: Frame,
        refusal: Refusal,
        pid: int,
        hello: Hello | None = None,
    ) -> None:
        await self._send(
            stream, response_frame(frame, PayloadProtocol.CONTROL, refusal_reply(refusal))
        )
        self._refused(
            refusal,
            pid,
            hello.service_name if hello is not None else "",
            hello.wanted_version if hello is not None else "",
        )

    async def _hello(
        self, stream: trio.abc.Stream, frame: Frame, peer: transports.PeerIdentity
    ) -> None:
        started = trio.current_time()
        hello, spec = self._admit(frame, peer)
        if isinstance(spec, Refusal):
            await self._refuse(stream, frame, spec, peer.pid, hello)
            return
        assert hello is not None  # a service is only chosen for a decoded Hello
        key = BackendKey(spec.instance_id, hello.service_name, hello.wanted_version)
        acquired = await self._acquire(key, spec, frame, stream)
        if acquired is None:
            self.events.emit(
                EventKind.PEER_DROPPED,
                service_name=hello.service_name,
                service_version=hello.wanted_version,
                pid=peer.pid,
                reason="client left while its Hello waited for the backend",
            )
            return
        if isinstance(acquired, Refusal):
            await self._refuse(stream, frame, acquired, peer.pid, hello)
            return
        await self._negotiate(stream, frame, hello, acquired, peer, started)

    def _admit(
        self, frame: Frame, peer: transports.PeerIdentity
    ) -> tuple[Hello | None, ServiceSpec | Refusal]:
        """Every check before a backend is looked for, in the reference order (SPEC §4).

        Returns the decoded Hello (``None`` when it was refused before decoding) with
        the service to route to, or the refusal.
        """
        fault = check_envelope(
            frame, kind=FrameKind.REQUEST, payload_protocol=PayloadProtocol.CONTROL
        )
        if fault is not None:
            code, reason = _ENVELOPE_REFUSALS[fault]
            return None, Refusal(code, reason)
        if not self._accepting:
            return None, Refusal(RefusalCode.SHUTTING_DOWN, "broker is shutting down")
        if self.fd_guard.demoted:
            return None, self.fd_guard.refusal()
        try:
            hello = decode(Hello, frame.payload)
        except MalformedMessage:
            return None, Refusal(RefusalCode.PEER_REJECTED, "malformed Hello payload")
        refusal = check_hello_shape(hello, peer.pid) or self._rate_limiter.check(
            peer.pid, trio.current_time()
        )
        if refusal is not None:
            return hello, refusal
        spec = self._load_service(hello.service_name)
        if isinstance(spec, Refusal):
            return hello, spec
        refusal = VersionPolicy(spec.min_version, spec.version_allow_list).check(
            hello.wanted_version
        )
        return hello, refusal if refusal is not None else spec

    def _load_service(self, name: str) -> ServiceSpec | Refusal:
        try:
            return self._catalog.load(name)
        except InvalidServiceName:
            return Refusal(RefusalCode.PEER_REJECTED, "invalid service_name")
        except ServiceNotFound:
            return Refusal(RefusalCode.SERVICE_UNKNOWN, "service definition was not found")
        except ServiceLoadError as exc:
            return Refusal(
                RefusalCode.SERVICE_UNKNOWN, f"service definition could not be loaded: {exc}"
            )

    async def _acquire(
        self, key: BackendKey, spec: ServiceSpec, frame: Frame, stream: trio.abc.Stream
    ) -> BackendHandle | Refusal | None:
        """Wait for the backend under the Hello's own deadline, or until shutdown begins.

        Returns ``None`` when the client hangs up meanwhile: its wait is cancelled,
        while the spawn goes on for everyone else (it runs in the supervisor).
        """
        running = self.backends.running(key)
        if running is not None:
            return running
        if frame.deadline_unix_ms:
            remaining = frame.deadline_unix_ms / 1000 - time.time()
        else:
            remaining = self.config.hello_wait_timeout_s
        result: BackendHandle | Refusal | None = None
        client_left = False

        async def watch_client(scope: trio.CancelScope) -> None:
            nonlocal client_left
            if await transports.wait_peer_closed(stream):
                client_left = True
                scope.cancel()

        async with trio.open_nursery() as race:
            race.start_soon(cancel_when_set, self._stopping, race.cancel_scope)
            race.start_soon(watch_client, race.cancel_scope)
            with trio.move_on_after(max(0.0, remaining)):
                result = await self.backends.acquire(key, spec)
            race.cancel_scope.cancel()
        if result is not None:
            return result
        if client_left:
            return None
        if self._stopping.is_set():
            return Refusal(RefusalCode.SHUTTING_DOWN, "broker is shutting down")
        return Refusal(
            RefusalCode.BACKEND_SPAWN_FAILED,
            "backend was not ready before the Hello deadline",
            NOT_READY_RETRY_AFTER_MS,
        )

    async def _negotiate(
        self,
        stream: trio.abc.Stream,
        frame: Frame,
        hello: Hello,
        backend: BackendHandle,
        peer: transports.PeerIdentity,
        started: float,
    ) -> None:
        now = trio.current_time()
        connection_id = next(self._connection_ids)
        self.backends.note_routed(backend, now)
        opted_in = bool(hello.client_capabilities & Capability.HANDLE_PASSING)
        token = None
        if opted_in:
            decision = self.handoff.decide(
                client_opted_in=True, backend=backend, fd_pressure=self.fd_guard.demoted, now=now
            )
            if isinstance(decision, Attempt):
                token = self.handoff.issue(backend, now)
        negotiated = Negotiated(
            negotiated_protocol=PROTOCOL_VERSION,
            daemon_version=backend.key.service_version,
            backend_pipe=backend.endpoint,
            server_capabilities=int(Capability.HANDLE_PASSING) if token is not None else 0,
            keepalive_interval_secs=negotiated_keepalive(hello.client_keepalive_secs),
            handle_passed_token=token.raw if token is not None else b"",
            connection_id=connection_id,
        )
        reply = response_frame(
            frame, PayloadProtocol.CONTROL, encode(HelloReply(negotiated=negotiated))
        )
        self.metrics.hello(
            hello.service_name, hello.wanted_version, "negotiated", trio.current_time() - started
        )
        if token is None:
            await self._send(stream, reply)
            return
        outcome = await self.handoff.attempt(stream, backend, token, connection_id, reply)
        if isinstance(outcome, HandoffFellBack) and not outcome.fd_reached_backend:
            # The connection never left the broker: tell the client now so it falls
            # back at once instead of waiting for its handoff-ready timeout.
            await self._send(
                stream,
                control.handoff_ready_event(
                    token=token.raw,
                    accepted=False,
                    detail=outcome.detail,
                    correlation_id=connection_id,
                ),
            )


def response_frame(request: Frame | None, protocol: int, payload: bytes) -> bytes:
    """A framed RESPONSE echoing ``request``'s id and trace context (id 0 when unknown)."""
    if request is None:
        request = Frame(envelope_version=PROTOCOL_VERSION, payload_protocol=protocol)
    return framed(response_to(request, payload, payload_protocol=protocol))


async def serve_broker(
    config: BrokerConfig,
    *,
    launcher: BackendLauncher | None = None,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker until it is shut down or cancelled; use with ``nursery.start``.

    ``task_status.started`` reports the ``Broker`` once its endpoint is bound and
    accepting. Cancellation: see ``Broker.serve``.
    """
    await Broker(config, launcher=launcher).serve(task_status=task_status)


@asynccontextmanager
async def open_broker(
    config: BrokerConfig, *, launcher: BackendLauncher | None = None
) -> AsyncIterator[Broker]:
    """Run a broker for the duration of the ``async with`` block.

    Leaving the block shuts the broker down gracefully; cancelling the
    surrounding scope does the same with trio semantics. Either way no fd, task
    or child process is left behind.
    """
    async with trio.open_nursery() as nursery:
        broker: Broker = await nursery.start(
            functools.partial(serve_broker, config, launcher=launcher)
        )
        try:
            yield broker
        finally:
            broker.request_shutdown()
