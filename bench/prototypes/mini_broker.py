"""A bare trio broker doing exactly the wire work of reconnect and pipelined handoff.

Run as ``python -m bench.prototypes.mini_broker SOCKET RUNTIME_DIR [--task-per-hello]
[--backend-writes-reply]``; prints ``serving on`` to stderr once its backend
(``mini_backend``) is ready.

Per connection it checks the peer's uid (``SO_PEERCRED``), reads exactly one frame
(header, then body: a pipelined request behind the Hello stays in the socket),
decodes the ``Frame`` and the ``Hello``, and answers:
- no handle-passing bit: ``Negotiated{backend_pipe}`` and close (reconnect);
- with it: a fresh 16-byte token and connection id, ``Negotiated{token}`` written
  on the connection, then ONE ``sendmsg`` to the backend carrying the token packet
  and the v1 ``HandoffOffer`` frame together (descriptor in ``SCM_RIGHTS``), then
  close. The backend's ``HandoffAck`` is read by a separate task, off every
  client's critical path, and retires the pending entry.

By default a Hello whose bytes are already there is answered inside the accept
loop, without a task of its own; only one that must wait gets a task
(``--task-per-hello`` gives every connection a task, the usual trio shape).

``--backend-writes-reply`` measures a protocol-compatible variant of the handoff
route: the broker writes nothing on a connection it hands off; the ``Negotiated``
frame travels to the backend in the same ``sendmsg`` (after the offer), and the
backend writes ``Negotiated`` + EVENT + its first reply in one ``send``. The client
sees the same bytes in the same order, but is woken once instead of first by the
broker's reply (when it can do nothing yet) and then by the backend's.

What it does not do: anything that is not wire work. No service catalog, version
policy, rate limit, supervision, events, metrics, or ACK deadline sweep: this is
the bound the real broker's design is measured against, not a broker.
"""

from __future__ import annotations

import array
import itertools
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import trio

from bench.prototypes.lean import (
    SEND_FLAGS,
    listen_unix,
    negotiated_frame,
    peer_uid,
    read_frame_nowait,
)
from rpbroker import control
from rpbroker.wire import HandoffAck, Hello
from rpbroker.wire.codes import Capability
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import FRAME_HEADER_BYTES

#: Environment variable naming the backend's end of the control socketpair.
CONTROL_FD_ENV = "BENCH_PROTO_CONTROL_FD"
#: Adoption window written into each offer, seconds (the real broker's default).
ADOPT_WINDOW_S = 5.0
#: Accepts handled back to back before the loop yields to other tasks.
ACCEPT_BURST = 16
#: recv size on the control channel, bytes.
_CONTROL_RECV_BYTES = 65536


class MiniBroker:
    def __init__(
        self,
        control_sock: socket.socket,
        endpoint: str,
        *,
        task_per_hello: bool,
        backend_writes_reply: bool,
    ) -> None:
        self.control = control_sock
        self.endpoint = endpoint
        self.task_per_hello = task_per_hello
        self.backend_writes_reply = backend_writes_reply
        self.uid = os.getuid()
        self.ids = itertools.count(1)
        self.pending: dict[int, bytes] = {}
        self.acked = 0

    def answer(self, conn: socket.socket, body: bytes) -> None:
        """Reply to one Hello (and pass the connection on for a handoff); closes ``conn``."""
        try:
            frame = decode_frame(body)
            hello = decode(Hello, frame.payload)
            connection_id = next(self.ids)
            if hello.client_capabilities & Capability.HANDLE_PASSING:
                token = secrets.token_bytes(16)
                reply = negotiated_frame(frame, self.endpoint, connection_id, token)
                if not self.backend_writes_reply:
                    conn.send(reply, SEND_FLAGS)
                offer = control.handoff_offer(
                    token=token,
                    service_name=hello.service_name,
                    correlation_id=connection_id,
                    deadline_unix_ms=int((time.time() + ADOPT_WINDOW_S) * 1000),
                )
                fds = array.array("i", [conn.fileno()]).tobytes()
                message = token + offer + reply if self.backend_writes_reply else token + offer
                sent = self.control.sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], SEND_FLAGS
                )
                if sent != len(message):
                    raise RuntimeError("short sendmsg on the control channel")
                self.pending[connection_id] = token
            else:
                conn.send(negotiated_frame(frame, self.endpoint, connection_id), SEND_FLAGS)
        finally:
            conn.close()

    def try_now(self, conn: socket.socket) -> bytearray | None:
        """Answer at once if the whole Hello is there; else the bytes read so far."""
        if peer_uid(conn) != self.uid:
            conn.close()
            return None
        got = bytearray()
        try:
            body = read_frame_nowait(conn, got)
        except (EOFError, ValueError, OSError):
            conn.close()
            return None
        if body is None:
            return got
        self.answer(conn, body)
        return None

    async def serve_waiting(self, conn: socket.socket, got: bytearray) -> None:
        """A Hello whose bytes were not all there: wait for them, then answer.

        Cancellation: closes the connection.
        """
        try:
            while (body := read_frame_nowait(conn, got)) is None:
                await trio.lowlevel.wait_readable(conn)
        except (EOFError, ValueError, OSError):
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        self.answer(conn, body)

    async def serve_one(self, conn: socket.socket) -> None:
        """The ``--task-per-hello`` shape: every connection in a task. Cancellation: closes it."""
        got = self.try_now(conn)
        if got is not None:
            await self.serve_waiting(conn, got)

    async def accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept forever. Cancellation: stops accepting."""
        burst = 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                burst = 0
                await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            if self.task_per_hello:
                nursery.start_soon(self.serve_one, conn)
            else:
                got = self.try_now(conn)
                if got is not None:
                    nursery.start_soon(self.serve_waiting, conn, got)
            burst += 1
            if burst >= ACCEPT_BURST:
                burst = 0
                await trio.lowlevel.checkpoint()

    async def read_acks(self) -> None:
        """Retire pending handoffs as their ACKs arrive. Cancellation: stops reading."""
        buf = bytearray()
        while True:
            try:
                chunk = self.control.recv(_CONTROL_RECV_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.control)
                continue
            if not chunk:
                return
            buf += chunk
            while len(buf) >= FRAME_HEADER_BYTES:
                end = FRAME_HEADER_BYTES + int.from_bytes(buf[1:5], "little")
                if len(buf) < end:
                    break
                frame = decode_frame(bytes(buf[FRAME_HEADER_BYTES:end]))
                del buf[:end]
                ack = decode(HandoffAck, frame.payload)
                token = self.pending.pop(ack.correlation_id, None)
                if token is not None and token == bytes(ack.token) and ack.accepted:
                    self.acked += 1


async def main(path: str, runtime_dir: str, task_per_hello: bool, backend_reply: bool) -> None:
    """Start the backend, then serve until killed. Cancellation: kills the backend."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    endpoint = str(Path(runtime_dir) / "proto-backend.sock")
    env = dict(os.environ, **{CONTROL_FD_ENV: str(child_end.fileno())})
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.prototypes.mini_backend", endpoint]
        + (["--reply-follows-offer"] if backend_reply else []),
        pass_fds=(child_end.fileno(),),
        env=env,
    )
    child_end.close()
    parent_end.setblocking(False)
    try:
        await trio.lowlevel.wait_readable(parent_end)
        if parent_end.recv(1) != b"R":
            raise RuntimeError("the prototype backend did not report ready")
        broker = MiniBroker(
            parent_end, endpoint, task_per_hello=task_per_hello, backend_writes_reply=backend_reply
        )
        listener = listen_unix(path)
        print(f"mini_broker: serving on {path}", file=sys.stderr, flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker.read_acks)
            nursery.start_soon(broker.accept_loop, listener, nursery)
    finally:
        process.kill()


if __name__ == "__main__":
    flags = sys.argv[3:]
    trio.run(
        main,
        sys.argv[1],
        sys.argv[2],
        "--task-per-hello" in flags,
        "--backend-writes-reply" in flags,
    )
