"""The lean Hello load generator: a process of its own, one epoll loop, raw sockets.

Run as ``python -m bench.hello_load SOCKET CLIENTS COUNT [--handoff]``. It keeps
CLIENTS connections in flight: each connects, writes one pre-encoded Hello, reads
exactly one reply frame and closes, and is replaced at once until COUNT replies
have arrived (after a warm-up of one round per client). It prints one JSON line:
``hellos`` (all replies, warm-up included, for per-Hello CPU), ``timed_hellos``,
``elapsed_s`` (timed part only), ``per_s`` and ``cpu_ns`` (this process).

The same generator drives the broker, the minimal responder and the prototype, so
Hellos per second and server CPU per Hello compare like with like. The first and
the last reply are decoded and must be ``Negotiated``: a refusal (rate limit, a
missing service) stops the run instead of producing a flattering number.

What it does not do: decode every reply (that would make the generator, not the
server, the bottleneck), or measure the server (the orchestrator reads its CPU
from ``/proc``).
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import time

from rpbroker.client import hello_frame, negotiated_or_raise
from rpbroker.wire import HelloReply
from rpbroker.wire.frames import decode, decode_frame
from rpbroker.wire.framing import FRAME_HEADER_BYTES, MAX_FRAME_BYTES, parse_header

#: recv size, bytes: a reply fits many times over.
_RECV_BYTES = 65536
#: Wait before retrying a connect refused with EAGAIN (full backlog), seconds.
_BACKLOG_RETRY_S = 0.0005


def _complete(buf: bytes) -> int:
    """Length of the first frame in ``buf`` if it is complete, else 0."""
    if len(buf) < FRAME_HEADER_BYTES:
        return 0
    end = FRAME_HEADER_BYTES + parse_header(buf[:FRAME_HEADER_BYTES], MAX_FRAME_BYTES)
    return end if len(buf) >= end else 0


def _check_reply(frame: bytes) -> None:
    negotiated_or_raise(decode(HelloReply, decode_frame(frame[FRAME_HEADER_BYTES:]).payload))


class Generator:
    """CLIENTS concurrent connections, each one Hello and one reply."""

    def __init__(self, path: str, hello: bytes, clients: int) -> None:
        self._path = path
        self._hello = hello
        self._clients = clients
        self._epoll = select.epoll()
        self._open: dict[int, tuple[socket.socket, bytearray]] = {}

    def _start_one(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        while True:
            try:
                sock.connect(self._path)
                break
            except BlockingIOError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
                time.sleep(_BACKLOG_RETRY_S)
        sock.send(self._hello)
        self._open[sock.fileno()] = (sock, bytearray())
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def run(self, count: int) -> int:
        """Complete ``count`` Hellos with ``clients`` in flight; returns replies received."""
        issued = done = 0
        while issued < min(self._clients, count):
            self._start_one()
            issued += 1
        while done < count:
            for fd, _mask in self._epoll.poll():
                sock, buf = self._open[fd]
                chunk = sock.recv(_RECV_BYTES)
                if not chunk:
                    raise SystemExit("the server closed a connection without a whole reply")
                buf += chunk
                end = _complete(bytes(buf))
                if not end:
                    continue
                if done == 0 or done == count - 1:
                    _check_reply(bytes(buf[:end]))
                self._epoll.unregister(fd)
                del self._open[fd]
                sock.close()
                done += 1
                if issued < count:
                    self._start_one()
                    issued += 1
        return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hello_load")
    parser.add_argument("socket")
    parser.add_argument("clients", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--handoff", action="store_true", help="set the handle-passing bit")
    args = parser.parse_args(argv)
    hello = hello_frame("echo", "1.0.0", handoff=args.handoff)
    generator = Generator(args.socket, hello, args.clients)
    cpu = time.process_time_ns()
    warm = generator.run(args.clients)
    started = time.perf_counter()
    timed = generator.run(args.count)
    elapsed = time.perf_counter() - started
    cpu = time.process_time_ns() - cpu
    print(
        json.dumps(
            {
                "hellos": warm + timed,
                "timed_hellos": timed,
                "elapsed_s": elapsed,
                "per_s": timed / elapsed,
                "cpu_ns": cpu,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
