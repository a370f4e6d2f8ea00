"""A lean v1 client on blocking sockets, one function per route.

What this does: opens one connection by a given route with plain blocking
``AF_UNIX`` sockets and the exact v1 bytes rpbroker's own client sends, and returns
the nanoseconds from the start of the connect to the first byte echoed by the
backend (for ``hello``: to the whole ``Negotiated``): the floor (connect to the
backend, one round trip), reconnect (Hello without the handle-passing bit,
``Negotiated``, connect to ``backend_pipe``), plain handoff (Hello with the bit,
``Negotiated``, handoff-ready EVENT, then the request) and pipelined handoff (the
request right behind the Hello, as ``rpbroker.connect(initial_data=...)`` sends it).
Each route checks that it was really taken: a fallback or a wrong echo raises
``RouteError``.

What it does not do: run trio (so its own cost is a few syscalls and two protobuf
decodes, not the trio client's), retry, or time the close (it happens after the
clock stops, but its CPU counts). Hello-skip is not here: on the wire it *is* the
floor (same connect, same bytes), so only the trio client's row shows its cost.
"""

from __future__ import annotations

import socket
import time

from rpbroker.client import hello_frame
from rpbroker.wire import HandoffAck, HelloReply, Negotiated
from rpbroker.wire.codes import Capability, FrameKind
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import FRAME_HEADER_BYTES, MAX_FRAME_BYTES, parse_header
from rpbroker.wire.protocols import PayloadProtocol

#: The request the client sends and expects echoed: one byte.
REQUEST = b"x"
#: recv size, bytes: a reply, an EVENT and the echo fit many times over.
_RECV_BYTES = 65536


class RouteError(Exception):
    """The connection did not take the route that was asked for, or the echo was wrong."""


class _Reader:
    """Whole frames from a blocking socket; bytes after them stay in ``rest``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.rest = b""

    def frame_body(self) -> bytes:
        buf = self.rest
        while True:
            if len(buf) >= FRAME_HEADER_BYTES:
                end = FRAME_HEADER_BYTES + parse_header(buf[:FRAME_HEADER_BYTES], MAX_FRAME_BYTES)
                if len(buf) >= end:
                    self.rest = buf[end:]
                    return buf[FRAME_HEADER_BYTES:end]
            chunk = self._sock.recv(_RECV_BYTES)
            if not chunk:
                raise RouteError("the peer closed the connection inside a frame")
            buf += chunk

    def first_byte(self) -> bytes:
        if self.rest:
            return self.rest[:1]
        return self._sock.recv(1)


class WireClient:
    """Route functions bound to one broker, service and version."""

    def __init__(self, broker: str, service: str, version: str) -> None:
        self.broker = broker
        self._reconnect_hello = hello_frame(service, version, handoff=False)
        self._handoff_hello = hello_frame(service, version, handoff=True)
        self.backend_endpoint = ""

    def learn_endpoint(self) -> str:
        """One reconnect, to learn (and remember) the backend endpoint for the floor."""
        self.reconnect()
        return self.backend_endpoint

    def floor(self) -> int:
        started = time.perf_counter_ns()
        got, done = _echo_once(self.backend_endpoint)
        _check_echo(got)
        return done - started

    def hello(self) -> int:
        """Hello -> ``Negotiated`` only (a warm backend): connect, Hello, whole reply."""
        started = time.perf_counter_ns()
        body, done = self._ask_broker()
        _negotiated(body)
        return done - started

    def reconnect(self) -> int:
        started = time.perf_counter_ns()
        body, _ = self._ask_broker()
        endpoint = _negotiated(body).backend_pipe
        got, done = _echo_once(endpoint)
        _check_echo(got)
        self.backend_endpoint = endpoint
        return done - started

    def _ask_broker(self) -> tuple[bytes, int]:
        """Send the reconnect Hello; (reply body, ns clock when it was complete)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.broker)
            sock.sendall(self._reconnect_hello)
            body = _Reader(sock).frame_body()
            return body, time.perf_counter_ns()
        finally:
            sock.close()

    def handoff(self) -> int:
        """Plain handoff: the request goes out once the handoff-ready EVENT arrived."""
        return self._handoff(pipelined=False)

    def handoff_pipelined(self) -> int:
        """Pipelined handoff: the request rides right behind the Hello."""
        return self._handoff(pipelined=True)

    def _handoff(self, *, pipelined: bool) -> int:
        started = time.perf_counter_ns()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.broker)
            sock.sendall(self._handoff_hello + REQUEST if pipelined else self._handoff_hello)
            reader = _Reader(sock)
            negotiated = _negotiated(reader.frame_body())
            token = bytes(negotiated.handle_passed_token)
            if not (negotiated.server_capabilities & Capability.HANDLE_PASSING and token):
                raise RouteError("the broker chose the reconnect route")
            _check_ready(reader.frame_body(), token)
            if not pipelined:
                sock.sendall(REQUEST)
            got = reader.first_byte()
            elapsed = time.perf_counter_ns() - started
        finally:
            sock.close()
        _check_echo(got)
        return elapsed


def _echo_once(endpoint: str) -> tuple[bytes, int]:
    """Connect, send the request, read one byte; (that byte, ns clock when it came)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(endpoint)
        sock.sendall(REQUEST)
        got = sock.recv(1)
        return got, time.perf_counter_ns()
    finally:
        sock.close()


def _negotiated(body: bytes) -> Negotiated:
    frame = decode_frame(body)
    if int(frame.kind) != FrameKind.RESPONSE or frame.payload_protocol != PayloadProtocol.CONTROL:
        raise RouteError("the broker's reply is not a control RESPONSE")
    reply = decode(HelloReply, frame.payload)
    if reply.WhichOneof("result") != "negotiated":
        raise RouteError(f"the broker refused: {reply.refused.reason}")
    negotiated: Negotiated = reply.negotiated
    return negotiated


def _check_ready(body: bytes, token: bytes) -> None:
    frame = decode_frame(body)
    if int(frame.kind) != FrameKind.EVENT or frame.payload_protocol != PayloadProtocol.HANDOFF:
        raise RouteError("expected the handoff-ready EVENT")
    ack = decode(HandoffAck, frame.payload)
    if bytes(ack.token) != token or not ack.accepted:
        raise RouteError(f"the handoff fell back: {ack.error_detail or 'token mismatch'}")


def _check_echo(got: bytes) -> None:
    if got != REQUEST:
        raise RouteError(f"expected the echo {REQUEST!r}, got {got!r}")
