"""Reading, writing and closing an accepted connection without waiting (Unix).

What this module does: lets the broker answer a Hello whose bytes are already in
the socket inside its accept loop, with no task, cancel scope or checkpoint of its
own. ``receive_now`` takes at most the bytes asked for that are waiting now (never
more, so whatever follows a frame stays for the connection's next owner),
``send_now`` writes what fits in the socket buffer now, and ``close_now`` closes
the connection. None of them waits, yields or checkpoints.

What it does not do: parse frames, retry, or wait. A caller that gets "nothing
yet" (``None`` or a short write) carries on in a task with the ordinary trio
stream. Only ``trio.SocketStream`` connections qualify; for anything else the
functions report that nothing could be done.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_nowait is part of the Unix transport"

import os

import trio

from transports._unix_fdpass import send_to_fd_now


def _fd_of(stream: trio.abc.Stream) -> int | None:
    """The descriptor of an open ``trio.SocketStream``; ``None`` for anything else."""
    if not isinstance(stream, trio.SocketStream):
        return None
    fd = stream.socket.fileno()
    return fd if fd >= 0 else None


def receive_now(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """Up to ``max_bytes`` bytes already waiting on ``stream``; ``b""`` at end of stream.

    Returns ``None`` when nothing is waiting yet or ``stream`` is not an open
    socket stream (nothing was taken). Raises ``trio.BrokenResourceError`` when
    the connection failed (for example reset by the peer).
    """
    fd = _fd_of(stream)
    if fd is None:
        return None
    try:
        # read(2) on a socket is recv(2) without flags; trio made it nonblocking.
        # No socket object is built for it: this runs for every accepted Hello.
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"connection failed: {exc}") from exc


def send_now(stream: trio.abc.Stream, data: bytes) -> int:
    """Write as much of ``data`` as fits now; the number of bytes written.

    ``0`` when the buffer is full or ``stream`` is not a socket stream. Raises
    ``trio.BrokenResourceError`` if the peer is gone (no SIGPIPE is raised).
    """
    fd = _fd_of(stream)
    return 0 if fd is None else send_to_fd_now(fd, data)


def close_now(stream: trio.abc.Stream) -> bool:
    """Close ``stream`` at once (telling trio first); ``False`` if it needs ``aclose``."""
    if not isinstance(stream, trio.SocketStream):
        return False
    stream.socket.close()
    return True
