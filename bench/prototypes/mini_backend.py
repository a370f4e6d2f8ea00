"""The bare trio backend behind ``mini_broker``: echo, by either route.

Run by ``mini_broker`` as ``python -m bench.prototypes.mini_backend ENDPOINT
[--reply-follows-offer]`` with
its end of the control socketpair named in ``BENCH_PROTO_CONTROL_FD``; writes one
``R`` on the channel once it listens, and exits when the channel closes.

- Reconnect route: accept on ENDPOINT, a handler task per connection.
- Handoff route: each control message is the broker's single ``sendmsg``: the
  16-byte token packet followed by the v1 ``HandoffOffer`` frame, with the
  client's descriptor in ``SCM_RIGHTS``. Descriptors pair with messages in
  order (the kernel ends every read at a descriptor-carrying packet, and the
  broker sends nothing else on this direction), so one ``recvmsg`` usually
  yields a whole offer. The offer is checked (token in the packet equals the
  token in the offer, correlation id, deadline) and the handler starts on the
  adopted connection at once. The handoff-ready EVENT is *corked*: it goes out
  in the same ``send`` as the handler's first reply, or before the handler first
  waits for input, whichever comes first, so the client wakes once for EVENT and
  reply. Only then is the ``HandoffAck`` queued; one task sends queued ACKs to
  the broker in a single write, off the client's critical path.
- ``--reply-follows-offer``: each control message carries the broker's
  ``Negotiated`` frame after the offer; it is corked in front of the EVENT, so the
  client gets reply, EVENT and first response in one segment.

What it does not do: answer probes or broadcasts, report activity, or flush a
corked EVENT for a handler that computes for long before any I/O (a real SDK
needs a short timer for that: the client waits at most 2 s for the EVENT).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

import trio

from bench.prototypes.lean import SEND_FLAGS, LeanUnixStream, echo, listen_unix
from bench.prototypes.mini_broker import CONTROL_FD_ENV
from rpbroker import control
from rpbroker.wire import HandoffOffer
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import FRAME_HEADER_BYTES
from transports._unix_fdpass import RECV_ANCILLARY_BYTES, fds_from_ancillary

TOKEN_BYTES = 16
_RECV_BYTES = 65536


class CorkedStream(LeanUnixStream):
    """An adopted connection whose handoff-ready EVENT leaves with the first reply.

    ``on_flushed`` runs once the EVENT is out (it queues the ACK).
    Cancellation: as ``LeanUnixStream``.
    """

    def __init__(self, sock: socket.socket, event: bytes, on_flushed: Callable[[], None]) -> None:
        super().__init__(sock)
        self._event: bytes | None = event
        self._on_flushed = on_flushed

    def _flushed(self) -> None:
        self._event = None
        self._on_flushed()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._event is not None:
            try:
                data = self.sock.recv(max_bytes or _RECV_BYTES)
            except BlockingIOError:
                # About to wait for input: the client must see the EVENT first.
                await super().send_all(self._event)
                self._flushed()
            else:
                await trio.lowlevel.checkpoint()
                return data
        return await super().receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._event is not None:
            event = self._event
            await super().send_all(event + bytes(data))
            self._flushed()
            return
        await super().send_all(data)

    async def aclose(self) -> None:
        if self._event is not None:
            with contextlib.suppress(OSError):
                self.sock.send(self._event, SEND_FLAGS)
            self._flushed()
        await super().aclose()


class MiniBackend:
    def __init__(
        self, control_sock: socket.socket, nursery: trio.Nursery, *, reply_follows: bool
    ) -> None:
        self.control = control_sock
        self.reply_follows = reply_follows
        self.nursery = nursery
        self.acks: list[bytes] = []
        self.ack_wanted = trio.Event()

    async def run_handler(self, stream: trio.abc.Stream) -> None:
        """Cancellation: the stream is closed."""
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await echo(stream)

    async def accept_loop(self, listener: socket.socket) -> None:
        """Reconnect route. Cancellation: stops accepting."""
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            self.nursery.start_soon(self.run_handler, LeanUnixStream(conn))

    def adopt(self, fd: int, token: bytes, body: bytes, reply: bytes) -> None:
        conn = socket.socket(fileno=fd)
        conn.setblocking(False)
        frame = decode_frame(body)
        offer = decode(HandoffOffer, frame.payload)
        cid = offer.correlation_id
        good = (
            bytes(offer.token) == token
            and frame.request_id == cid
            and time.time() * 1000 < frame.deadline_unix_ms
        )
        event = reply + control.handoff_ready_event(
            token=token, accepted=good, detail="" if good else "refused", correlation_id=cid
        )
        ack = control.handoff_reply(
            token=token, accepted=good, detail="" if good else "refused", correlation_id=cid
        )
        if not good:
            conn.send(event, SEND_FLAGS)
            conn.close()
            self.queue_ack(ack)
            return
        self.nursery.start_soon(
            self.run_handler, CorkedStream(conn, event, lambda: self.queue_ack(ack))
        )

    def queue_ack(self, ack: bytes) -> None:
        self.acks.append(ack)
        self.ack_wanted.set()

    async def send_acks(self) -> None:
        """Send queued ACKs, many in one write. Cancellation: stops."""
        while True:
            await self.ack_wanted.wait()
            self.ack_wanted = trio.Event()
            data, self.acks = b"".join(self.acks), []
            stream = LeanUnixStream(self.control)
            await stream.send_all(data)

    async def read_offers(self) -> None:
        """Adopt every offered connection. Cancellation: stops; returns at EOF."""
        buf = bytearray()
        fds: deque[int] = deque()
        while True:
            try:
                chunk, ancdata, _flags, _addr = self.control.recvmsg(
                    _RECV_BYTES, RECV_ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.control)
                continue
            if not chunk:
                return
            fds.extend(fds_from_ancillary(ancdata))
            buf += chunk
            while (message := self._split(buf)) is not None:
                token, body, reply = message
                self.adopt(fds.popleft(), token, body, reply)

    def _split(self, buf: bytearray) -> tuple[bytes, bytes, bytes] | None:
        """Take one whole message (token, offer body, reply frame) off ``buf``, if there."""
        start = TOKEN_BYTES + FRAME_HEADER_BYTES
        if len(buf) < start:
            return None
        end = start + int.from_bytes(buf[TOKEN_BYTES + 1 : start], "little")
        reply_end = end
        if self.reply_follows:
            if len(buf) < end + FRAME_HEADER_BYTES:
                return None
            reply_end = end + FRAME_HEADER_BYTES + int.from_bytes(buf[end + 1 : end + 5], "little")
        if len(buf) < reply_end:
            return None
        message = bytes(buf[:TOKEN_BYTES]), bytes(buf[start:end]), bytes(buf[end:reply_end])
        del buf[:reply_end]
        return message


async def main(endpoint: str, reply_follows: bool) -> None:
    """Serve until the broker closes the control channel. Cancellation: stops serving."""
    control_sock = socket.socket(fileno=int(os.environ[CONTROL_FD_ENV]))
    control_sock.setblocking(False)
    listener = listen_unix(endpoint)
    async with trio.open_nursery() as nursery:
        backend = MiniBackend(control_sock, nursery, reply_follows=reply_follows)
        nursery.start_soon(backend.accept_loop, listener)
        nursery.start_soon(backend.send_acks)
        control_sock.send(b"R")
        await backend.read_offers()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], "--reply-follows-offer" in sys.argv[2:])
