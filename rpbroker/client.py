"""Client: ``async with rpbroker.connect(service, version) as stream``.

What this module does: gets the caller a trio stream to the backend of a
service, by the best route available: Hello-skip (a cached backend endpoint for
the exact same version answers), the handoff route (the broker passes this very
connection to the backend, which confirms with a handoff-ready EVENT), or the
reconnect route (connect to the negotiated ``backend_pipe``). ``initial_data`` is
sent right behind the Hello so it waits in the socket for whichever process ends
up owning the connection; on fallback it is re-sent on the reconnect route, so
the caller never knows the difference. The handle-passing capability bit is set
only when this client will adopt a handed-off connection.

What it does not do: retry refusals (they raise ``RefusedError`` with the wire
code and retry-after), or surface failures of the handoff optimisation (they
fall back silently).
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict, Unpack

import attrs
import trio

import transports
from rpbroker._version import __version__
from rpbroker.endpoint_cache import (
    CacheKey,
    EndpointCache,
    EndpointCheck,
    current_endpoint_cache,
    forget_run_cache,
)
from rpbroker.errors import (
    BackendUnavailableError,
    BrokerProtocolError,
    BrokerUnavailableError,
    ConnectArgumentError,
    ConnectTimeoutError,
    RefusedError,
)
from rpbroker.policy.hello import (
    SERVICE_NAME_GRAMMAR,
    VERSION_GRAMMAR,
    is_valid_semver,
    is_valid_service_name,
)
from rpbroker.probe_client import EndpointProbeError, ProbeFailure, probe_endpoint
from rpbroker.streams import PrefixedStream
from rpbroker.wire import Frame, HandoffAck, Hello, HelloReply, Negotiated
from rpbroker.wire.codes import PROTOCOL_VERSION, Capability, FrameKind, RefusalCode
from rpbroker.wire.frames import (
    MalformedMessage,
    check_envelope,
    decode,
    decode_frame,
    encode,
    framed,
    request,
)
from rpbroker.wire.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameStage,
    FramingError,
    TruncatedFrame,
    parse_header,
)
from rpbroker.wire.protocols import PayloadProtocol

#: How long the client waits for the handoff-ready EVENT before reconnecting when
#: the broker's reply states no adoption deadline (the reference broker), s
#: (facts §3.5: 2 s).
DEFAULT_HANDOFF_READY_TIMEOUT_S = 2.0
#: How long past the broker's adoption deadline the client still waits for the
#: handoff-ready EVENT, s: a backend adopts only before the deadline and writes the
#: EVENT immediately, so this covers an EVENT written just before the deadline
#: that is still in flight. Only after it is ``initial_data`` re-sent.
HANDOFF_EVENT_GRACE_S = 0.5
#: Overall bound on ``connect``, s (facts §4: 30 s).
DEFAULT_CONNECT_TIMEOUT_S = 30.0
#: Hellos sent before giving up when each negotiated backend turns out unreachable:
#: one retry covers a backend that crashed mid-handoff and was respawned.
NEGOTIATION_ATTEMPTS = 2
#: ``Hello.client_lib_name``.
CLIENT_LIB_NAME = "rpbroker"
#: ``Hello.client_lib_version``: the installed rpbroker version.
CLIENT_LIB_VERSION = __version__


class Route(enum.Enum):
    """How the stream reached the backend."""

    HANDOFF = "handoff"
    RECONNECT = "reconnect"
    HELLO_SKIP = "hello-skip"


class BrokeredStream(PrefixedStream):
    """A stream to the backend, with the route that produced it.

    ``prefix`` holds backend bytes that arrived together with the broker's frames.
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        route: Route,
        endpoint: str,
        negotiated: Negotiated | None,
        prefix: bytes = b"",
    ) -> None:
        super().__init__(inner, prefix)
        self.route = route
        #: The backend endpoint (cached for Hello-skip).
        self.endpoint = endpoint
        #: The broker's reply, or ``None`` on the Hello-skip route.
        self.negotiated = negotiated

    @property
    def connection_id(self) -> int:
        return self.negotiated.connection_id if self.negotiated is not None else 0


def default_broker_endpoint() -> str:
    """``$RPBROKER_SOCKET`` or the per-user shared broker endpoint."""
    return os.environ.get("RPBROKER_SOCKET") or transports.broker_endpoint("shared")


def forget_cached_endpoints() -> None:
    """Drop every endpoint in the current run's cache (Hello-skip starts from scratch).

    Outside ``trio.run`` there is no cache, so this does nothing.
    """
    forget_run_cache()


def check_service_and_version(service: str, version: str) -> None:
    """Raise ``ConnectArgumentError`` (a ``ValueError``) unless both match the Hello grammar.

    The same checks the broker applies (``rpbroker.policy.hello``), so a name or
    version it would refuse with PEER_REJECTED fails here, before any I/O.
    """
    if not is_valid_service_name(service):
        raise ConnectArgumentError("service", service, SERVICE_NAME_GRAMMAR)
    if not is_valid_semver(version):
        raise ConnectArgumentError("version", version, VERSION_GRAMMAR)


def hello_frame(
    service: str,
    version: str,
    *,
    handoff: bool,
    client_version: str = "",
    keepalive_secs: int = 0,
    request_id: int = 1,
    deadline_unix_ms: int = 0,
    traceparent: str = "",
    tracestate: str = "",
) -> bytes:
    """The framed Hello this client sends."""
    hello = Hello(
        client_min_protocol=PROTOCOL_VERSION,
        client_max_protocol=PROTOCOL_VERSION,
        service_name=service,
        wanted_version=version,
        client_version=client_version,
        client_capabilities=int(Capability.HANDLE_PASSING) if handoff else 0,
        request_id="hello",
        peer_pid=os.getpid(),
        client_lib_name=CLIENT_LIB_NAME,
        client_lib_version=CLIENT_LIB_VERSION,
        client_keepalive_secs=keepalive_secs,
    )
    frame = request(
        PayloadProtocol.CONTROL,
        encode(hello),
        request_id=request_id,
        deadline_unix_ms=deadline_unix_ms,
        traceparent=traceparent,
        tracestate=tracestate,
    )
    return framed(frame)


class _FrameReader:
    """Reads whole frames from the broker connection, keeping what follows them.

    Everything after the Negotiated reply on this connection is for the client
    (the handoff-ready EVENT, then the backend's bytes), so unlike the broker the
    client may read ahead; ``rest`` hands the surplus to the stream it returns.
    """

    #: Read size, bytes: a reply, an EVENT and a first backend message fit easily.
    CHUNK = 65536

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def read_body(self) -> bytes:
        while True:
            if len(self._buffer) >= FRAME_HEADER_BYTES:
                length = parse_header(bytes(self._buffer[:FRAME_HEADER_BYTES]), MAX_FRAME_BYTES)
                end = FRAME_HEADER_BYTES + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[FRAME_HEADER_BYTES:end])
                    del self._buffer[:end]
                    return body
            chunk = await self._stream.receive_some(self.CHUNK)
            if not chunk:
                stage = (
                    FrameStage.BODY
                    if len(self._buffer) >= FRAME_HEADER_BYTES
                    else FrameStage.LENGTH
                )
                raise TruncatedFrame(stage, len(self._buffer), FRAME_HEADER_BYTES, 0)
            self._buffer += chunk

    def rest(self) -> bytes:
        return bytes(self._buffer)


async def _read_reply(reader: _FrameReader) -> NegotiatedReply:
    """The broker's ``Negotiated`` reply, with the adoption deadline its frame states."""
    try:
        body = await reader.read_body()
    except FramingError as exc:
        raise BrokerUnavailableError(
            f"broker closed the connection without a reply ({exc})"
        ) from exc
    except (trio.BrokenResourceError, OSError) as exc:
        raise BrokerUnavailableError(f"broker connection failed: {exc}") from exc
    return negotiated_from_reply_body(body)


@attrs.frozen
class NegotiatedReply:
    """The broker's ``Negotiated`` and the adoption deadline of its frame.

    ``adopt_by_unix_ms`` is the frame's ``deadline_unix_ms``: with a handoff, the
    wall-clock time after which the backend never adopts (0: not stated, as from
    the reference broker).
    """

    negotiated: Negotiated
    adopt_by_unix_ms: int

    def handoff_wait_s(self, default_s: float) -> float:
        """How long to wait for the handoff-ready EVENT.

        With an adoption deadline: until it plus ``HANDOFF_EVENT_GRACE_S`` (the
        backend never adopts after it, so ``initial_data`` re-sent after this
        wait is never delivered twice). Without one: ``default_s``.
        """
        if not self.adopt_by_unix_ms:
            return default_s
        return max(0.0, self.adopt_by_unix_ms / 1000 - time.time()) + HANDOFF_EVENT_GRACE_S


def negotiated_from_reply_body(body: bytes) -> NegotiatedReply:
    """The ``Negotiated`` reply in the body of the broker's Hello response frame.

    Raises ``RefusedError`` for a refusal and ``BrokerProtocolError`` for a frame
    that is not a control-plane RESPONSE carrying a decodable ``HelloReply``.
    """
    try:
        frame = decode_frame(body)
        fault = check_envelope(
            frame, kind=FrameKind.RESPONSE, payload_protocol=PayloadProtocol.CONTROL
        )
        if fault is not None:
            raise BrokerProtocolError(f"unexpected Hello response: {fault.name.lower()} mismatch")
        reply = decode(HelloReply, frame.payload)
    except MalformedMessage as exc:
        raise BrokerProtocolError(f"undecodable Hello response: {exc}") from exc
    return NegotiatedReply(negotiated_or_raise(reply), frame.deadline_unix_ms)


def negotiated_or_raise(reply: HelloReply) -> Negotiated:
    """The ``Negotiated`` arm of a HelloReply; ``RefusedError`` for the refused arm.

    An unknown refusal code becomes ``RefusalCode.UNSPECIFIED``; an empty oneof is a
    ``BrokerProtocolError``.
    """
    which = reply.WhichOneof("result")
    if which == "negotiated":
        negotiated: Negotiated = reply.negotiated
        return negotiated
    if which == "refused":
        try:
            code = RefusalCode(reply.refused.code)
        except ValueError:
            code = RefusalCode.UNSPECIFIED
        raise RefusedError(
            code,
            reply.refused.reason,
            reply.refused.retry_after_ms or None,
            dict(reply.refused.details),
        )
    raise BrokerProtocolError("Hello response carries neither negotiated nor refused")


async def _await_handoff_ready(reader: _FrameReader, token: bytes, timeout_s: float) -> bool:
    """Wait for the handoff-ready EVENT; ``True`` only for an accepted ACK with our token."""
    with trio.move_on_after(timeout_s):
        try:
            body = await reader.read_body()
        except (FramingError, trio.BrokenResourceError, OSError):
            return False
        return is_handoff_ready_event(body, token)
    return False


def is_handoff_ready_event(body: bytes, token: bytes) -> bool:
    """True when a frame body is the handoff-ready EVENT accepting exactly ``token``.

    Anything else (another frame kind or protocol, an undecodable ACK, a rejection,
    a different token) is False: the client then falls back to reconnecting.
    """
    try:
        frame: Frame = decode_frame(body)
        if check_envelope(frame, kind=FrameKind.EVENT, payload_protocol=PayloadProtocol.HANDOFF):
            return False
        ack = decode(HandoffAck, frame.payload)
    except MalformedMessage:
        return False
    return bytes(ack.token) == token and ack.accepted


async def _connect_backend(endpoint: str, initial_data: bytes) -> trio.abc.Stream:
    """Connect to a backend endpoint and write ``initial_data``.

    Raises ``BackendUnavailableError`` when the endpoint is unreachable or the
    backend closes the connection before ``initial_data`` is written (it is
    stopping). Cancellation: the connection is closed.
    """
    try:
        stream = await transports.connect(endpoint)
    except transports.TransportError as exc:
        raise BackendUnavailableError(f"backend endpoint {endpoint} is unreachable: {exc}") from exc
    try:
        if initial_data:
            await stream.send_all(initial_data)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        if isinstance(exc, trio.BrokenResourceError | OSError):
            raise BackendUnavailableError(
                f"backend at {endpoint} closed the connection before the request was sent: {exc}"
            ) from exc
        raise
    return stream


async def open_connection(
    service: str,
    version: str,
    *,
    broker: str | None = None,
    initial_data: bytes = b"",
    handoff: bool = True,
    hello_skip: bool = True,
    handoff_ready_timeout_s: float = DEFAULT_HANDOFF_READY_TIMEOUT_S,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    client_version: str = "",
    keepalive_secs: int = 0,
    traceparent: str = "",
    tracestate: str = "",
    endpoint_cache: EndpointCache | None = None,
) -> BrokeredStream:
    """Return a stream to ``service`` at ``version``; the caller must close it.

    ``endpoint_cache`` holds the backend endpoints Hello-skip uses; by default the
    current trio run's (``rpbroker.endpoint_cache.current_endpoint_cache``).

    Raises ``ConnectArgumentError`` (a ``ValueError``) for a malformed
    ``service`` or ``version`` before any I/O, ``RefusedError`` (with the wire
    code, retry-after and the broker's details) when the broker refuses,
    ``BrokerUnavailableError`` when no broker answers, ``BackendUnavailableError``
    when the negotiated endpoint cannot be reached, and ``ConnectTimeoutError``
    after ``timeout_s``.

    Cancellation: a cancelled call closes every connection it opened; nothing is
    left behind on the client side.
    """
    check_service_and_version(service, version)
    broker_path = broker or default_broker_endpoint()
    cache = current_endpoint_cache() if endpoint_cache is None else endpoint_cache
    cache_key = (broker_path, service, version)
    try:
        with trio.fail_after(timeout_s):
            skipped = await _hello_skip(cache, cache_key, initial_data) if hello_skip else None
            if skipped is not None:
                return skipped
            hello = hello_frame(
                service,
                version,
                handoff=handoff,
                client_version=client_version,
                keepalive_secs=keepalive_secs,
                deadline_unix_ms=int((time.time() + timeout_s) * 1000),
                traceparent=traceparent,
                tracestate=tracestate,
            )
            for attempt in range(NEGOTIATION_ATTEMPTS):
                try:
                    return await _negotiate(
                        broker_path,
                        cache,
                        cache_key,
                        hello,
                        initial_data=initial_data,
                        handoff=handoff,
                        handoff_ready_timeout_s=handoff_ready_timeout_s,
                    )
                except BackendUnavailableError:
                    # The negotiated backend died between the reply and our
                    # connect; the broker knows by now and routes to its successor.
                    if attempt + 1 == NEGOTIATION_ATTEMPTS:
                        raise
            raise AssertionError("unreachable")
    except trio.TooSlowError as exc:
        raise ConnectTimeoutError(
            f"no route to {service} {version} within {timeout_s:g} s"
        ) from exc


async def _hello_skip(
    cache: EndpointCache, key: CacheKey, initial_data: bytes
) -> BrokeredStream | None:
    """A stream straight to the cached backend endpoint of ``key``, or ``None`` (send a Hello).

    An entry's identity is probed once, on its first use (``probe_endpoint``: pid
    alive, executable, BLAKE3 hash, boot), never on every connection. Once is
    enough: backend endpoint names are random 128-bit values that are never
    reused, and a listener never silently replaces an existing path, so while the
    verified backend lives a connect to that name reaches it, and once it is gone
    the connect fails and the entry is dropped. An entry whose probe fails is
    marked refused and served by Hellos from then on, without probing again.

    Cancellation: a cancelled call closes what it opened (probe or backend
    connection); the entry keeps its last recorded state.
    """
    cached = cache.get(key)
    if cached is None or cached.check is EndpointCheck.REFUSED:
        await trio.lowlevel.checkpoint()
        return None
    if cached.check is EndpointCheck.UNVERIFIED:
        try:
            await probe_endpoint(cached.endpoint)
        except EndpointProbeError as exc:
            if exc.failure is ProbeFailure.UNREACHABLE:
                cache.forget(key, cached.endpoint)
            else:
                cache.record_check(key, cached.endpoint, EndpointCheck.REFUSED)
            return None
        cache.record_check(key, cached.endpoint, EndpointCheck.VERIFIED)
    try:
        stream = await _connect_backend(cached.endpoint, initial_data)
    except BackendUnavailableError:
        cache.forget(key, cached.endpoint)
        return None
    return BrokeredStream(stream, Route.HELLO_SKIP, cached.endpoint, None)


async def _negotiate(
    broker_path: str,
    cache: EndpointCache,
    cache_key: CacheKey,
    hello: bytes,
    *,
    initial_data: bytes,
    handoff: bool,
    handoff_ready_timeout_s: float,
) -> BrokeredStream:
    try:
        stream = await transports.connect(broker_path)
    except transports.TransportError as exc:
        raise BrokerUnavailableError(f"no broker at {broker_path}: {exc}") from exc
    keep = False
    try:
        # The request rides right behind the Hello when the connection may be
        # handed off; the broker reads exactly one frame and leaves it in place.
        await stream.send_all(hello + initial_data if handoff else hello)
        reader = _FrameReader(stream)
        reply = await _read_reply(reader)
        negotiated = reply.negotiated
        token = bytes(negotiated.handle_passed_token)
        if (
            handoff
            and negotiated.server_capabilities & Capability.HANDLE_PASSING
            and token
            and await _await_handoff_ready(
                reader, token, reply.handoff_wait_s(handoff_ready_timeout_s)
            )
        ):
            keep = True
            cache.remember(cache_key, negotiated.backend_pipe)
            return BrokeredStream(
                stream, Route.HANDOFF, negotiated.backend_pipe, negotiated, reader.rest()
            )
    except (trio.BrokenResourceError, OSError) as exc:
        raise BrokerUnavailableError(f"broker connection failed: {exc}") from exc
    finally:
        if not keep:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    if not negotiated.backend_pipe:
        raise BrokerProtocolError("broker negotiated an empty backend_pipe")
    backend = await _connect_backend(negotiated.backend_pipe, initial_data)
    cache.remember(cache_key, negotiated.backend_pipe)
    return BrokeredStream(backend, Route.RECONNECT, negotiated.backend_pipe, negotiated)


class ConnectOptions(TypedDict, total=False):
    """The keyword options of ``open_connection`` and ``connect``."""

    broker: str | None
    initial_data: bytes
    handoff: bool
    hello_skip: bool
    handoff_ready_timeout_s: float
    timeout_s: float
    client_version: str
    keepalive_secs: int
    traceparent: str
    tracestate: str
    endpoint_cache: EndpointCache | None


@asynccontextmanager
async def connect(
    service: str, version: str, **options: Unpack[ConnectOptions]
) -> AsyncIterator[BrokeredStream]:
    """``open_connection`` as an async context manager that closes the stream.

    Accepts the same keyword options as ``open_connection``.
    """
    stream = await open_connection(service, version, **options)
    async with stream:
        yield stream


__all__ = [
    "BrokeredStream",
    "ConnectOptions",
    "Route",
    "check_service_and_version",
    "connect",
    "default_broker_endpoint",
    "forget_cached_endpoints",
    "hello_frame",
    "is_handoff_ready_event",
    "negotiated_from_reply_body",
    "negotiated_or_raise",
    "open_connection",
]
