"""The minimal trio responder: accept, read one v1 frame, write a fixed reply, close.

Run as ``python -m bench.prototypes.responder SOCKET``; prints ``serving on`` to
stderr once it listens. It is the comparison point of the Hello-throughput target:
a plain trio server (``trio.serve_listeners``, a task per connection,
``trio.SocketStream``) doing the broker's wire work and nothing else. It reads
exactly one frame, never a byte past it (header, then body, as the broker must,
since a pipelined request behind the Hello belongs to the backend), and answers
with a ``Negotiated`` reply encoded once at start with rpbroker's wire code, so its
reply has the broker's size.

What it does not do: decode the Hello, check the peer, or route anything.
"""

from __future__ import annotations

import sys

import trio

from bench.prototypes.lean import listen_unix, negotiated_frame
from rpbroker.wire.framing import FRAME_HEADER_BYTES

#: The reply every connection gets (a typical backend endpoint path length).
REPLY = negotiated_frame(None, "/tmp/rpb-bench-broker-xxxxxxxx/rpb-v1-0-be-" + "0" * 32, 1)


async def _exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        if not chunk:
            raise EOFError
        got += chunk
    return got


async def respond(stream: trio.SocketStream) -> None:
    """Read one frame, write ``REPLY``, close.

    Cancellation: the stream is closed either way.
    """
    async with stream:
        try:
            header = await _exactly(stream, FRAME_HEADER_BYTES)
            await _exactly(stream, int.from_bytes(header[1:5], "little"))
            await stream.send_all(REPLY)
        except (EOFError, trio.BrokenResourceError):
            return


async def main(path: str) -> None:
    """Serve until killed. Cancellation: closes the listener."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(listen_unix(path)))
    print(f"responder: serving on {path}", file=sys.stderr, flush=True)
    await trio.serve_listeners(respond, [listener])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
