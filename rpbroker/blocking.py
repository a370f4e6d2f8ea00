"""Blocking client: a plain ``socket.socket`` to a brokered service, for code that is not trio.

What this module does: the client of ``rpbroker.client`` for scripts, threads and
other event loops: the same three routes (Hello-skip from an endpoint cache, the
handoff route where the broker passes this very connection to the backend, and
the reconnect route), the same keyword options (``ConnectOptions``) and the same
exceptions, with blocking socket calls bounded by ``timeout_s``. It works in any
thread and needs no trio run. ``initial_data`` rides behind the Hello when the
connection may be handed off and is re-sent on the reconnect route, as the async
client does. Frames are read exactly (header, then body), so the returned socket
holds nothing but the backend's bytes.

    client = rpbroker.BlockingClient()  # keep one: it remembers backend endpoints
    with client.connect("echo", "1.0.0", initial_data=b"ping") as sock:
        sock.recv(4)

``rpbroker.connect_blocking(...)`` is the one-shot form (a fresh client, so no
Hello-skip). A ``socket.socket`` is its own context manager.

What it does not do: speak the wire itself (it uses the sans-IO helpers of
``rpbroker.client`` and ``rpbroker.wire``), retry refusals, run on Windows (where
endpoints are named pipes, not sockets: ``transports.connect_blocking`` raises
``transports.PlatformUnsupportedError``), or honour cancellation: a blocking call
ends by its timeout only.
"""

from __future__ import annotations

import socket
import time
from typing import Unpack

import attrs

import transports
from rpbroker.client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_HANDOFF_READY_TIMEOUT_S,
    NEGOTIATION_ATTEMPTS,
    ConnectOptions,
    Route,
    check_service_and_version,
    default_broker_endpoint,
    hello_frame,
    is_handoff_ready_event,
    negotiated_from_reply_body,
)
from rpbroker.endpoint_cache import CacheKey, EndpointCache, EndpointCheck
from rpbroker.errors import (
    BackendUnavailableError,
    BrokerError,
    BrokerProtocolError,
    BrokerUnavailableError,
    ConnectTimeoutError,
)
from rpbroker.wire import Negotiated
from rpbroker.wire.codes import Capability
from rpbroker.wire.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameStage,
    FramingError,
    TruncatedFrame,
    parse_header,
)


@attrs.frozen
class BrokeredSocket:
    """A blocking socket to the backend, with the route that produced it.

    ``socket`` is connected to the backend (on the handoff route it is the very
    connection the Hello went out on) and has no timeout set. The caller owns it;
    ``with`` closes it.
    """

    socket: socket.socket
    route: Route
    #: The backend endpoint (cached for Hello-skip).
    endpoint: str
    #: The broker's reply, or ``None`` on the Hello-skip route.
    negotiated: Negotiated | None

    @property
    def connection_id(self) -> int:
        return self.negotiated.connection_id if self.negotiated is not None else 0

    def __enter__(self) -> BrokeredSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.socket.close()


@attrs.frozen
class _Deadline:
    """An absolute ``time.monotonic()`` bound shared by every step of one connect."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
        return cls(time.monotonic() + seconds)

    def remaining_s(self) -> float:
        """Seconds left; the builtin ``TimeoutError`` once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the connect deadline passed")
        return left


def _receive_up_to(sock: socket.socket, count: int, deadline: _Deadline) -> bytes:
    """Receive ``count`` bytes, asking for no more than are missing; fewer only at EOF."""
    data = bytearray()
    while len(data) < count:
        sock.settimeout(deadline.remaining_s())
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _receive_frame_body(sock: socket.socket, deadline: _Deadline) -> bytes:
    """Read exactly one frame and return its body; raises ``FramingError`` subclasses."""
    length = parse_header(_receive_up_to(sock, FRAME_HEADER_BYTES, deadline), MAX_FRAME_BYTES)
    body = _receive_up_to(sock, length, deadline)
    if len(body) < length:
        raise TruncatedFrame(FrameStage.BODY, len(body), length, FRAME_HEADER_BYTES)
    return body


def _send(sock: socket.socket, data: bytes, deadline: _Deadline) -> None:
    sock.settimeout(deadline.remaining_s())
    sock.sendall(data)


def _connect(
    endpoint: str, deadline: _Deadline, unreachable: type[BrokerError], what: str
) -> socket.socket:
    """``transports.connect_blocking`` within the deadline.

    A transport error becomes ``unreachable(what: error)``; ``TimeoutError`` and
    ``PlatformUnsupportedError`` pass unchanged.
    """
    try:
        return transports.connect_blocking(endpoint, deadline.remaining_s())
    except transports.PlatformUnsupportedError:
        raise
    except transports.TransportError as exc:
        raise unreachable(f"{what}: {exc}") from exc


def _connect_backend(endpoint: str, initial_data: bytes, deadline: _Deadline) -> socket.socket:
    sock = _connect(
        endpoint, deadline, BackendUnavailableError, f"backend endpoint {endpoint} is unreachable"
    )
    try:
        if initial_data:
            _send(sock, initial_data, deadline)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            raise BackendUnavailableError(f"backend endpoint {endpoint} failed: {exc}") from exc
        raise
    sock.settimeout(None)
    return sock


def _await_handoff_ready(
    sock: socket.socket, token: bytes, timeout_s: float, deadline: _Deadline
) -> bool:
    """Wait for the handoff-ready EVENT; ``True`` only for an accepted ACK with our token.

    Waits ``timeout_s`` at most, and never past the connect deadline, which then
    raises ``TimeoutError`` at the caller's next step.
    """
    wait = _Deadline.after(min(timeout_s, deadline.remaining_s()))
    try:
        body = _receive_frame_body(sock, wait)
    except (FramingError, OSError):  # OSError includes TimeoutError
        return False
    return is_handoff_ready_event(body, token)


@attrs.frozen(kw_only=True)
class _Settings:
    """``ConnectOptions`` with the defaults of ``rpbroker.open_connection`` filled in."""

    broker: str | None = None
    initial_data: bytes = b""
    handoff: bool = True
    hello_skip: bool = True
    handoff_ready_timeout_s: float = DEFAULT_HANDOFF_READY_TIMEOUT_S
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    client_version: str = ""
    keepalive_secs: int = 0
    traceparent: str = ""
    tracestate: str = ""
    endpoint_cache: EndpointCache | None = None

    @classmethod
    def of(cls, options: ConnectOptions) -> _Settings:
        return cls(**options)


class BlockingClient:
    """Connects to brokered services with blocking sockets; share one between threads.

    Holds the ``EndpointCache`` that makes the Hello-skip route possible, so keep
    one client per process (or per broker) rather than one per connection.
    """

    def __init__(self, cache: EndpointCache | None = None) -> None:
        self.cache = EndpointCache() if cache is None else cache

    def connect(
        self, service: str, version: str, **options: Unpack[ConnectOptions]
    ) -> socket.socket:
        """A blocking socket to ``service`` at ``version``; the caller closes it.

        Accepts the keyword options of ``rpbroker.connect`` and raises the same
        exceptions: ``ConnectArgumentError`` (a ``ValueError``) before any I/O,
        ``RefusedError``, ``BrokerUnavailableError``, ``BackendUnavailableError``,
        ``BrokerProtocolError``, ``ConnectTimeoutError`` after ``timeout_s``; on
        Windows ``transports.PlatformUnsupportedError``. Nothing is left open when
        it raises. The socket has no timeout set and works as a context manager.
        """
        return self.open(service, version, **options).socket

    def open(self, service: str, version: str, **options: Unpack[ConnectOptions]) -> BrokeredSocket:
        """``connect``, also reporting the route, the endpoint and the broker's reply."""
        check_service_and_version(service, version)
        settings = _Settings.of(options)
        deadline = _Deadline.after(settings.timeout_s)
        key = (settings.broker or default_broker_endpoint(), service, version)
        cache = settings.endpoint_cache or self.cache
        try:
            entry = cache.get(key) if settings.hello_skip else None
            # No identity probe here (the async client probes once per entry): an
            # endpoint the async client refused is not used, others are reached
            # directly, since backend endpoint names are random and never reused.
            if entry is not None and entry.check is not EndpointCheck.REFUSED:
                cached = entry.endpoint
                try:
                    sock = _connect_backend(cached, settings.initial_data, deadline)
                except BackendUnavailableError:
                    cache.forget(key, cached)
                else:
                    return BrokeredSocket(sock, Route.HELLO_SKIP, cached, None)
            hello = hello_frame(
                service,
                version,
                handoff=settings.handoff,
                client_version=settings.client_version,
                keepalive_secs=settings.keepalive_secs,
                deadline_unix_ms=int((time.time() + settings.timeout_s) * 1000),
                traceparent=settings.traceparent,
                tracestate=settings.tracestate,
            )
            for attempt in range(NEGOTIATION_ATTEMPTS):
                try:
                    return self._negotiate(cache, key, hello, settings, deadline)
                except BackendUnavailableError:
                    # The negotiated backend died between the reply and our
                    # connect; the broker knows by now and routes to its successor.
                    if attempt + 1 == NEGOTIATION_ATTEMPTS:
                        raise
            raise AssertionError("unreachable")
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                f"no route to {service} {version} within {settings.timeout_s:g} s"
            ) from exc

    def _negotiate(
        self,
        cache: EndpointCache,
        key: CacheKey,
        hello: bytes,
        settings: _Settings,
        deadline: _Deadline,
    ) -> BrokeredSocket:
        broker_path = key[0]
        sock = _connect(
            broker_path, deadline, BrokerUnavailableError, f"no broker at {broker_path}"
        )
        keep = False
        try:
            # As in the async client: the request rides right behind the Hello when
            # the connection may be handed off; the broker reads exactly one frame.
            _send(sock, hello + settings.initial_data if settings.handoff else hello, deadline)
            try:
                body = _receive_frame_body(sock, deadline)
            except FramingError as exc:
                raise BrokerUnavailableError(
                    f"broker closed the connection without a reply ({exc})"
                ) from exc
            reply = negotiated_from_reply_body(body)
            negotiated = reply.negotiated
            token = bytes(negotiated.handle_passed_token)
            if (
                settings.handoff
                and negotiated.server_capabilities & Capability.HANDLE_PASSING
                and token
                and _await_handoff_ready(
                    sock, token, reply.handoff_wait_s(settings.handoff_ready_timeout_s), deadline
                )
            ):
                keep = True
                sock.settimeout(None)
                cache.remember(key, negotiated.backend_pipe)
                return BrokeredSocket(sock, Route.HANDOFF, negotiated.backend_pipe, negotiated)
        except TimeoutError:
            raise
        except OSError as exc:
            raise BrokerUnavailableError(f"broker connection failed: {exc}") from exc
        finally:
            if not keep:
                sock.close()
        if not negotiated.backend_pipe:
            raise BrokerProtocolError("broker negotiated an empty backend_pipe")
        backend = _connect_backend(negotiated.backend_pipe, settings.initial_data, deadline)
        cache.remember(key, negotiated.backend_pipe)
        return BrokeredSocket(backend, Route.RECONNECT, negotiated.backend_pipe, negotiated)


def connect(service: str, version: str, **options: Unpack[ConnectOptions]) -> socket.socket:
    """One blocking connection with a fresh ``BlockingClient``: see ``BlockingClient.connect``.

    Nothing is cached between calls, so there is no Hello-skip route; keep a
    ``BlockingClient`` for repeated connections.
    """
    return BlockingClient().connect(service, version, **options)


__all__ = ["BlockingClient", "BrokeredSocket", "CacheKey", "EndpointCache", "connect"]
