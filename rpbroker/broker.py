"""The broker: accept loop, the Hello path, admin dispatch, graceful shutdown.

What this module does: binds the broker endpoint and serves every connection
(nothing a peer sends can stop the accept loop). For each one it checks the
kernel's peer identity before reading, reads exactly one frame under an absolute
deadline, and routes it. A Hello whose bytes are already in the socket and whose
answer needs no waiting (a refusal, or ``Negotiated`` for a ready backend without
a handoff) is answered inside the accept loop's own step, with no task; every
other connection continues in a task of its own from where that step left it.
Frames are routed to admin (``0xAD01``), to operator requests on rpbroker's
lifecycle lane (``operator_lane``: broadcasts, one service's stop, restart or
quiesce, event and backend-output streams), or to the Hello path: shape
validation, the per-peer rate limit, the service definition (re-read on every
Hello), the version policy, the backend supervisor (find or spawn) and finally a
``Negotiated`` or ``Refused`` reply echoing ``request_id`` and the trace context,
followed by a handoff attempt when both sides want one. It also owns graceful
shutdown and the embedding API (``open_broker``, ``serve_broker``).

What it does not do: policy arithmetic (``rpbroker.policy``), process and
control-channel management (``rpbroker.supervisor``), the handoff attempt itself
(``rpbroker.handoff``), verb rendering (``rpbroker.admin``), or anything platform
specific (``transports``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

import transports
from rpbroker import admin, control, operator_lane
from rpbroker._groups import single_exception_as_itself
from rpbroker._scopes import cancel_when_set
from rpbroker.config import BrokerConfig
from rpbroker.events import EventKind, EventLog, EventSubscription, LifecycleEvent
from rpbroker.handoff import ClientWrites, HandoffCoordinator, HandoffFellBack, HandoffPlan
from rpbroker.launcher import BackendLauncher
from rpbroker.metrics import BrokerMetrics
from rpbroker.policy.broadcast import BroadcastOperation, BroadcastResult
from rpbroker.policy.fd_pressure import FdPressureGuard
from rpbroker.policy.hello import (
    HelloRateLimiter,
    Refusal,
    VersionPolicy,
    check_hello_shape,
    negotiated_keepalive,
)
from rpbroker.policy.lifecycle import DEFAULT_TERMINATE_GRACE_S
from rpbroker.preflight import check_broker_start
from rpbroker.service_manager import ServiceManagerLink
from rpbroker.services import (
    LoadFailure,
    ServiceCatalog,
    ServiceLoadError,
    ServiceSpec,
    refusal_for,
)
from rpbroker.streams import PrefixedStream
from rpbroker.supervisor import BackendKey, BackendRegistry, Incarnation
from rpbroker.supervisor.incarnation import REAP_TIMEOUT_S
from rpbroker.wire import Frame, Hello, HelloReply, Negotiated, Refused
from rpbroker.wire._pb.broker_v1_pb2 import ErrorCode
from rpbroker.wire.codes import PROTOCOL_VERSION, Capability, FrameKind, RefusalCode, RefusalDetail
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
    FRAME_HEADER_BYTES,
    MAX_HELLO_BYTES,
    BadFramingByte,
    FrameTooLarge,
    FramingError,
    parse_header,
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


def _nothing() -> None:
    """Nothing to record."""


@attrs.frozen
class _Answer:
    """A Hello's last write: ``data``, then ``record`` (metrics and events)."""

    data: bytes
    record: Callable[[], None]


@attrs.frozen
class _AwaitBackend:
    """An admitted Hello whose backend is not routable yet: wait for it."""

    frame: Frame
    hello: Hello
    pid: int
    key: BackendKey
    spec: ServiceSpec
    started: float


@attrs.frozen
class _Deliver:
    """A negotiated Hello to hand off as ``plan`` says."""

    frame: Frame
    hello: Hello
    backend: Incarnation
    connection_id: int
    plan: HandoffPlan


@attrs.frozen
class _Begun:
    """How far ``Broker._serve_now`` took a connection before its task takes over.

    ``peer`` is ``None`` for a connection that only needs closing; ``first`` is the
    first frame (or its refusal), or the bytes of it already taken from the socket;
    ``step`` is where an admitted Hello stands.
    """

    peer: transports.PeerIdentity | None
    first: Frame | Refusal | bytes = b""
    step: _Answer | _AwaitBackend | _Deliver | None = None


def _decoded_first_frame(body: bytes) -> Frame | Refusal:
    """The first frame of a connection, or the refusal of a malformed one."""
    try:
        return decode_frame(body)
    except MalformedMessage:
        return Refusal(RefusalCode.PEER_REJECTED, "malformed broker Frame")


def refusal_reply(refusal: Refusal) -> bytes:
    """Encode a ``HelloReply{refused}`` payload for ``refusal``."""
    refused = Refused(
        reason=refusal.reason,
        daemon_min_protocol=PROTOCOL_VERSION,
        daemon_max_protocol=PROTOCOL_VERSION,
        code=ErrorCode.ValueType(refusal.code),
        retry_after_ms=refusal.retry_after_ms or 0,
        details=refusal.wire_details(),
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
        self.backends = BackendRegistry(
            config,
            self.events,
            launcher,
            on_spawn=lambda key, outcome: self.metrics.spawn(
                key.service_name, key.service_version, outcome.value
            ),
        )
        self.handoff = HandoffCoordinator(config, self.events, self.metrics)
        self.fd_guard = FdPressureGuard()
        self._catalog = ServiceCatalog(config.services_dir)
        self._rate_limiter = HelloRateLimiter(config.hello_rate_limit, config.hello_rate_window_s)
        self._connection_ids = itertools.count(1)
        self._user = transports.current_user()
        # Unset: the per-user shared endpoint, where clients look by default.
        self.socket_path = config.socket_path or transports.broker_endpoint("shared")
        self.started_at = time.time()
        #: True once the broker has bound its endpoint and accepted connections.
        self.started = False
        self.connections_open = 0
        self._no_connections = trio.Event()
        self._no_connections.set()
        self._accepting = False
        self._stop_requested = trio.Event()
        self._stopping = trio.Event()
        self._stopped = trio.Event()
        self._drain_timeout_s = config.drain_timeout_s
        # Bounds the graceful stop; ``force_stop`` cancels it.
        self._stop_scope = trio.CancelScope()
        self._service_manager = ServiceManagerLink(config)

    # -- public API ---------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """True while the broker accepts Hellos (false once shutdown began)."""
        return self._accepting

    @property
    def stopping(self) -> bool:
        """True once a shutdown began (graceful or forced)."""
        return self._stopping.is_set()

    def request_shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Start a graceful shutdown and return at once (see ``shutdown``)."""
        if drain_timeout_s is not None and not self._stopping.is_set():
            self._drain_timeout_s = drain_timeout_s
        self._stop_requested.set()

    def force_stop(self) -> None:
        """Stop now: kill every backend (SIGKILL to its group) and end the drain at once.

        For a second SIGINT/SIGTERM, or an embedder that cannot wait. Returns at
        once; ``wait_stopped`` tells when the broker is gone.
        """
        self.backends.kill_all()
        self._stop_scope.cancel()
        self._stop_requested.set()

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Shut down gracefully and wait until the broker has stopped.

        Stops accepting, refuses unfinished Hellos with SHUTTING_DOWN, quiesces
        every backend (its ACK wait inside the drain), lets them drain for up to
        ``drain_timeout_s`` (default from the config), then SIGTERM, a short
        grace and SIGKILL for what is left; removes the socket file.

        Cancellation: cancelling the wait does not undo the shutdown.
        """
        self.request_shutdown(drain_timeout_s)
        await self._stopped.wait()

    async def broadcast(
        self, operation: BroadcastOperation, *, ack_timeout_s: float | None = None
    ) -> BroadcastResult[Incarnation]:
        """Send a lifecycle operation to every live backend; see ``BackendRegistry.broadcast``.

        Cancellation: abandons the outstanding ACK waits.
        """
        return await self.backends.broadcast(operation, ack_timeout_s=ack_timeout_s)

    async def wait_stopped(self) -> None:
        """Wait until the broker has stopped (after a shutdown by any means).

        Cancellation: just stops waiting.
        """
        await self._stopped.wait()

    async def wait_stopping(self) -> None:
        """Wait until a shutdown has begun (graceful or forced).

        Cancellation: just stops waiting.
        """
        await self._stopping.wait()

    async def wait_connections_closed(self) -> None:
        """Wait until no client connection is being served by the broker itself.

        Routed connections (handed off or reconnected) belong to backends and do
        not count. Cancellation: just stops waiting.
        """
        await self._no_connections.wait()

    def status(self) -> dict[str, Any]:
        """The admin STATUS document (JSON-ready)."""
        return admin.status_document(self)

    def iter_events(self) -> EventSubscription:
        """Every lifecycle event from this call on, as an async iterator.

        The subscription starts now (events emitted before the first
        ``__anext__`` are kept), ends when the loop is left or the broker stops,
        and reports lost events (see ``EventSubscription``).
        """
        return self.events.subscribe()

    def recent_events(self) -> list[LifecycleEvent]:
        """The bounded in-memory event log, oldest first."""
        return self.events.recent()

    # -- serving --------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check the directories, bind, report ready through ``task_status``, serve until shut down.

        Raises the start-up errors of ``rpbroker.preflight.check_broker_start``
        before binding anything.

        Cancellation: cancelling the scope that runs ``serve`` (at any point,
        start-up included) performs the same graceful shutdown, shielded and
        bounded by the drain timeout plus the terminate grace and the reap bound,
        then kills any backend still alive; no descriptor, task or child process
        is left, and the call returns.
        """
        try:
            check_broker_start(self.config)
            listener = await self._service_manager.open_listener(self.socket_path)
        except BaseException:
            self._finish_stopped()
            raise
        self.socket_path = listener.path  # an inherited socket has its own
        try:
            with single_exception_as_itself():
                await self._serve_on(listener, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            self._finish_stopped()

    async def _serve_on(
        self, listener: transports.Listener, task_status: trio.TaskStatus[Broker]
    ) -> None:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(self.backends.run)
                if self.config.idle_check_enabled:
                    await nursery.start(self.backends.quiesce_idle)
                nursery.start_soon(self._accept_loop, listener, nursery)
                self._accepting = True
                self.started = True
                self.events.emit(EventKind.BROKER_STARTED, socket=self.socket_path)
                self._service_manager.ready(self.socket_path)
                task_status.started(self)
                await self._stop_requested.wait()
            finally:
                # Every way out (shutdown, cancellation, a crash in start-up)
                # drains first, bounded, then releases the backend registry's
                # shield so its cleanup (kill and reap) can run.
                with trio.CancelScope(shield=True):
                    await self._graceful_stop(listener)
                self.backends.release()
                nursery.cancel_scope.cancel()

    def _finish_stopped(self) -> None:
        self._accepting = False
        self._stopping.set()
        if not self._stopped.is_set():
            if self.started:  # a start-up that failed never started: nothing stopped
                self.events.emit(EventKind.BROKER_STOPPED)
            self.events.close()
            self._stopped.set()

    async def _graceful_stop(self, listener: transports.Listener) -> None:
        """Stop accepting, quiesce and drain the backends, bounded; never raises Cancelled.

        Bound: the drain timeout, plus the terminate grace and the reap bound for
        backends that ignore their drain deadline; ``force_stop`` ends it at once.
        """
        self._accepting = False
        self._stopping.set()
        drain_s = self._drain_timeout_s
        self.events.emit(EventKind.BROKER_STOPPING, drain_timeout_ms=int(drain_s * 1000))
        self._service_manager.stopping(drain_s)
        await listener.aclose()
        drain_deadline = trio.current_time() + drain_s
        with self._stop_scope:
            self._stop_scope.deadline = drain_deadline + DEFAULT_TERMINATE_GRACE_S + REAP_TIMEOUT_S
            await self.backends.stop_all(drain_deadline)

    async def _accept_loop(self, listener: transports.Listener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except transports.FdExhaustedError:
                demotion = self.fd_guard.on_fd_exhausted()
                if demotion.first:
                    self.events.emit(
                        EventKind.FD_PRESSURE, reason="accept failed: out of descriptors"
                    )
                await trio.sleep(demotion.backoff_s)
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if self.fd_guard.on_accept_ok():
                self.events.emit(EventKind.FD_PRESSURE_CLEARED)
            accepted_at = trio.current_time()
            begun = self._serve_now(stream)
            if begun is not None:
                nursery.start_soon(self._serve_connection, stream, accepted_at, begun)

    # -- one connection ------------------------------------------------------------------

    def _serve_now(self, stream: trio.abc.Stream) -> _Begun | None:
        """Serve what can be served without waiting; what is left for the connection's task.

        Runs in the accept loop's own step: the peer check, then, when the first
        frame is already in the socket, a Hello whose answer needs no waiting (a
        refusal, or ``Negotiated`` for a ready backend without a handoff) is
        answered and the connection closed here, with no task of its own. Returns
        ``None`` when the connection is finished, else where its task takes over.
        Whatever this raises is handled as in the task: it affects this
        connection alone.
        """
        try:
            peer = self._checked_peer(stream)
            if peer is None:
                return None if transports.close_now(stream) else _Begun(None)
            first = self._first_frame_now(stream)
            if not isinstance(first, Frame) or first.payload_protocol != PayloadProtocol.CONTROL:
                return _Begun(peer, first)
            step = self._hello_step(first, peer, trio.current_time())
            if not isinstance(step, _Answer):
                return _Begun(peer, first, step)
            try:
                sent = transports.send_now(stream, step.data)
            except trio.BrokenResourceError:
                step.record()  # decided, as when the task's write fails
                raise
            if sent < len(step.data):
                return _Begun(peer, first, attrs.evolve(step, data=step.data[sent:]))
            step.record()
        except (trio.BrokenResourceError, OSError) as exc:
            logger.debug("connection ended: %s", exc)
        except Exception as exc:
            self._connection_failed(exc)
        return None if transports.close_now(stream) else _Begun(None)

    async def _serve_connection(
        self, stream: trio.abc.Stream, accepted_at: float, begun: _Begun
    ) -> None:
        """Serve one connection from where ``_serve_now`` left it; it affects it alone.

        Cancellation: the connection is closed; nothing else is touched.
        """
        self.connections_open += 1
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        try:
            if begun.peer is not None:
                await self._handle_connection(stream, accepted_at, begun)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.debug("connection ended: %s", exc)
        except Exception as exc:
            self._connection_failed(exc)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.connections_open -= 1
            if self.connections_open == 0:
                self._no_connections.set()

    def _connection_failed(self, exc: Exception) -> None:
        """The per-connection exception boundary: log with the traceback, count.

        The caller closes this connection only; every other client is unaffected.
        """
        self.metrics.connection_error()
        logger.error("error serving a connection; closing it alone", exc_info=exc)
        self.events.emit(EventKind.CONNECTION_FAILED, reason=f"{type(exc).__name__}: {exc}")

    def _checked_peer(self, stream: trio.abc.Stream) -> transports.PeerIdentity | None:
        """The kernel's identity of the peer, or ``None`` (announced) if it is refused."""
        try:
            peer = transports.peer_identity(stream)
        except transports.TransportError as exc:
            self.events.emit(EventKind.PEER_DROPPED, reason=f"peer identity unavailable: {exc}")
            return None
        if peer.user != self._user:
            self.events.emit(
                EventKind.PEER_DROPPED,
                pid=peer.pid,
                reason="credential policy refused a peer of another user",
                peer_user=peer.user,
            )
            return None
        return peer

    def _first_frame_now(self, stream: trio.abc.Stream) -> Frame | Refusal | bytes:
        """The first frame if it is all in the socket already; else the bytes of it taken.

        Takes the header, then (when its length is within the Hello cap) exactly
        the body: never a byte past the frame. Anything short or malformed is left
        to the task's reader (as the bytes taken so far), which waits for the rest
        or refuses it with the reason.
        """
        header = transports.receive_now(stream, FRAME_HEADER_BYTES)
        if not header:  # nothing yet, not a socket, or end of stream: the task sees which
            return b""
        if len(header) < FRAME_HEADER_BYTES:
            return header
        try:
            length = parse_header(header, MAX_HELLO_BYTES)
        except FramingError:
            return header
        body = transports.receive_now(stream, length) if length else b""
        if body is None or len(body) < length:
            return header + (body or b"")
        return _decoded_first_frame(body)

    async def _handle_connection(
        self, stream: trio.abc.Stream, accepted_at: float, begun: _Begun
    ) -> None:
        assert begun.peer is not None
        peer = begun.peer
        first: Frame | Refusal | None
        if isinstance(begun.first, bytes):
            taken = begun.first
            with trio.CancelScope(deadline=accepted_at + self.config.hello_timeout_s) as scope:
                first = await self._read_first_frame(
                    PrefixedStream(stream, taken) if taken else stream
                )
            if scope.cancelled_caught:
                self.events.emit(
                    EventKind.PEER_DROPPED,
                    pid=peer.pid,
                    reason="no complete frame before the deadline",
                )
                return
            if first is None:
                return
        else:
            first = begun.first
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
            await operator_lane.serve_lifecycle_frame(
                self, first, stream, functools.partial(self._send, stream)
            )
            return
        step = begun.step or self._hello_step(first, peer, trio.current_time())
        await self._finish_hello(stream, step)

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
        return _decoded_first_frame(body)

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

    # -- the Hello path: each decision is a step, served now or in the task -----------

    def _hello_step(
        self, frame: Frame, peer: transports.PeerIdentity, started: float
    ) -> _Answer | _AwaitBackend | _Deliver:
        """Admit the Hello (SPEC §4 order) and take it as far as it goes without waiting."""
        hello, spec = self._admit(frame, peer)
        if isinstance(spec, Refusal):
            return self._refusal(frame, spec, peer.pid, hello)
        assert hello is not None  # a service is only chosen for a decoded Hello
        key = BackendKey(spec.instance_id, hello.service_name, hello.wanted_version)
        running = self.backends.routable(key)
        if running is None:
            return _AwaitBackend(frame, hello, peer.pid, key, spec, started)
        return self._negotiation(frame, hello, running, started)

    def _refusal(self, frame: Frame, refusal: Refusal, pid: int, hello: Hello | None) -> _Answer:
        """The refusal reply, recorded once it has been written (or could not be)."""
        service = hello.service_name if hello is not None else ""
        version = hello.wanted_version if hello is not None else ""
        return _Answer(
            response_frame(frame, PayloadProtocol.CONTROL, refusal_reply(refusal)),
            functools.partial(self._refused, refusal, pid, service, version),
        )

    def _negotiation(
        self, frame: Frame, hello: Hello, backend: Incarnation, started: float
    ) -> _Answer | _Deliver:
        """``Negotiated`` for ``backend``: the plain reply, or a handoff to deliver."""
        connection_id = next(self._connection_ids)
        backend.note_routed()
        plan = self.handoff.plan(
            client_opted_in=bool(hello.client_capabilities & Capability.HANDLE_PASSING),
            backend=backend,
            fd_pressure=self.fd_guard.demoted,
            connection_id=connection_id,
            hello_deadline_unix_ms=frame.deadline_unix_ms,
            now=trio.current_time(),
        )
        self.metrics.hello(
            hello.service_name, hello.wanted_version, "negotiated", trio.current_time() - started
        )
        if not isinstance(plan, HandoffPlan):
            return _Answer(_negotiated_reply(frame, hello, backend, connection_id), _nothing)
        return _Deliver(frame, hello, backend, connection_id, plan)

    async def _finish_hello(
        self, stream: trio.abc.Stream, step: _Answer | _AwaitBackend | _Deliver
    ) -> None:
        """Carry a Hello from ``step`` to its end: wait for the backend, reply, hand off.

        Cancellation: a wait or a handoff in progress is abandoned (token revoked);
        the caller closes the connection.
        """
        if isinstance(step, _AwaitBackend):
            acquired = await self._acquire(step.key, step.spec, step.frame, stream)
            if acquired is None:
                self.events.emit(
                    EventKind.PEER_DROPPED,
                    service_name=step.hello.service_name,
                    service_version=step.hello.wanted_version,
                    pid=step.pid,
                    reason="client left while its Hello waited for the backend",
                )
                return
            if isinstance(acquired, Refusal):
                step = self._refusal(step.frame, acquired, step.pid, step.hello)
            else:
                step = self._negotiation(step.frame, step.hello, acquired, step.started)
        if isinstance(step, _Answer):
            await self._send(stream, step.data)
            step.record()
            return
        await self._deliver(stream, step)

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
        except ServiceLoadError as exc:
            code, reason = refusal_for(exc)
            if exc.kind is LoadFailure.UNLOADABLE:
                logger.warning("Hello for service %r refused (%s): %s", name, code.name, exc)
            details = (
                {RefusalDetail.SERVICE_NAME: name} if code is RefusalCode.SERVICE_UNKNOWN else {}
            )
            return Refusal(code, reason, details=details)

    async def _acquire(
        self, key: BackendKey, spec: ServiceSpec, frame: Frame, stream: trio.abc.Stream
    ) -> Incarnation | Refusal | None:
        """Wait for the backend under the Hello's own deadline, or until shutdown begins.

        Returns ``None`` when the client hangs up meanwhile: its wait is cancelled,
        while the spawn goes on for everyone else (it runs in the registry).

        Cancellation: abandons only this Hello's wait.
        """
        running = self.backends.routable(key)
        if running is not None:
            return running
        if frame.deadline_unix_ms:
            remaining = frame.deadline_unix_ms / 1000 - time.time()
        else:
            remaining = self.config.hello_wait_timeout_s
        result: Incarnation | Refusal | None = None
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

    async def _deliver(self, stream: trio.abc.Stream, step: _Deliver) -> None:
        """Hand the connection off as ``step.plan`` says; on a fallback, tell the client.

        Cancellation: the handoff in progress is abandoned (token revoked); the
        caller closes the connection.
        """
        frame, hello, backend, plan = step.frame, step.hello, step.backend, step.plan
        reply = _negotiated_reply(frame, hello, backend, step.connection_id, plan)
        outcome = await self.handoff.deliver(plan, stream, backend, reply, self._stopping)
        if not isinstance(outcome, HandoffFellBack):
            return
        if outcome.writes is ClientWrites.NOTHING:
            # Nothing reached the client: give it the plain reconnect route.
            await self._send(stream, _negotiated_reply(frame, hello, backend, step.connection_id))
        elif outcome.writes is ClientWrites.REPLY:
            # The reply went out but the connection never left the broker: say so
            # now, so the client falls back at once instead of at its deadline.
            await self._send(
                stream,
                control.handoff_ready_event(
                    token=plan.token.raw,
                    accepted=False,
                    detail=outcome.detail,
                    correlation_id=step.connection_id,
                ),
            )


def _negotiated_reply(
    frame: Frame,
    hello: Hello,
    backend: Incarnation,
    connection_id: int,
    plan: HandoffPlan | None = None,
) -> bytes:
    """The framed ``Negotiated`` reply; with ``plan``, the handoff token and its deadline."""
    negotiated = Negotiated(
        negotiated_protocol=PROTOCOL_VERSION,
        daemon_version=backend.key.service_version,
        backend_pipe=backend.endpoint,
        server_capabilities=int(Capability.HANDLE_PASSING) if plan is not None else 0,
        keepalive_interval_secs=negotiated_keepalive(hello.client_keepalive_secs),
        handle_passed_token=plan.token.raw if plan is not None else b"",
        connection_id=connection_id,
    )
    return response_frame(
        frame,
        PayloadProtocol.CONTROL,
        encode(HelloReply(negotiated=negotiated)),
        deadline_unix_ms=plan.adopt_by_unix_ms if plan is not None else 0,
    )


def response_frame(
    request: Frame | None, protocol: int, payload: bytes, *, deadline_unix_ms: int = 0
) -> bytes:
    """A framed RESPONSE echoing ``request``'s id and trace context (id 0 when unknown)."""
    if request is None:
        request = Frame(envelope_version=PROTOCOL_VERSION, payload_protocol=protocol)
    return framed(
        response_to(request, payload, payload_protocol=protocol, deadline_unix_ms=deadline_unix_ms)
    )


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
    or child process is left behind. A start-up error, or the body's exception
    when it is the only one, comes out as itself (not in an exception group).

    Cancellation: see ``Broker.serve``; the way out is bounded by the drain.
    """
    with single_exception_as_itself():
        async with trio.open_nursery() as nursery:
            broker: Broker = await nursery.start(
                functools.partial(serve_broker, config, launcher=launcher)
            )
            try:
                yield broker
            finally:
                broker.request_shutdown()
