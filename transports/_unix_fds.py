"""Small helpers for raw file descriptors on Unix.

What this module does: counts the process's open descriptors (``open_fd_count``,
used for fd-pressure decisions and leak tests), lists them with what each one
refers to (``open_fds``, for leak reports), reports descriptor use against the
limit (``fd_usage_ratio``), moves descriptors above the standard streams
(``above_stdio``), closes descriptors and sockets
that trio may be watching without raising, and turns a raw descriptor received
from another process into a ``trio.SocketStream``.

What it does not do: decide when descriptors are scarce (the policy core does) or
pass descriptors between processes (``_unix_fdpass`` does).
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_fds is part of the Unix transport"

import contextlib
import fcntl
import os
import resource
import socket

import trio

#: Directories listing the calling process's descriptors: Linux procfs first, then
#: the BSD/macOS fdescfs mount.
_FD_DIRECTORIES = ("/proc/self/fd", "/dev/fd")


def open_fd_count() -> int | None:
    """Number of descriptors the process has open, or ``None`` when it cannot tell.

    The descriptor used to list the directory is not counted.
    """
    for directory in _FD_DIRECTORIES:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        # listdir holds one descriptor open on the directory while it reads it.
        return max(len(entries) - 1, 0)
    return None


def fd_usage_ratio() -> float | None:
    """Open descriptors over the soft ``RLIMIT_NOFILE``, or ``None`` when unknown."""
    count = open_fd_count()
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if count is None or soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return count / soft


def open_fds() -> dict[int, str] | None:
    """The process's open descriptors, each with what it refers to; ``None`` if unknown.

    The target is the ``/proc/self/fd`` link text (``socket:[1234]``, ``pipe:[5]``,
    a path) on Linux and ``""`` where descriptors are not links (``/dev/fd`` on
    macOS). A descriptor closed while the directory is read is left out, and so
    is the one used to read it.
    """
    for directory in _FD_DIRECTORIES:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        found: dict[int, str] = {}
        for entry in entries:
            path = os.path.join(directory, entry)
            try:
                found[int(entry)] = os.readlink(path)
            except FileNotFoundError:
                continue  # closed meanwhile (the listing's own descriptor is)
            except OSError:
                found[int(entry)] = ""  # exists but is not a link (fdescfs)
        return found
    return None


#: Lowest descriptor number that no child's standard stream setup overwrites or
#: inherits (0-2 are stdin, stdout, stderr).
MIN_NON_STDIO_FD = 3


def above_stdio(fd: int) -> int:
    """``fd`` itself if it is above 2, else a close-on-exec duplicate above 2 (``fd`` is closed).

    A process started with closed standard streams gets 0-2 from ``pipe`` or
    ``socketpair``; a child would then have those replaced by its stdio set-up, or
    inherit them as its stdio.
    """
    if fd >= MIN_NON_STDIO_FD:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, MIN_NON_STDIO_FD)
    os.close(fd)
    return moved


def _notify_closing(target: int | socket.socket) -> None:
    """Wake trio tasks waiting on ``target`` before it is closed (no-op outside trio)."""
    # Outside trio.run (RuntimeError) nobody can be waiting.
    with contextlib.suppress(RuntimeError):
        trio.lowlevel.notify_closing(target)


def close_fd_quietly(fd: int) -> None:
    """Close a raw descriptor, telling trio first; errors (already closed) are ignored."""
    _notify_closing(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


def close_socket_quietly(sock: socket.socket) -> None:
    """Close a stdlib socket, telling trio first. Idempotent."""
    if sock.fileno() >= 0:
        _notify_closing(sock)
    sock.close()


def stream_from_fd(fd: int) -> trio.SocketStream:
    """Adopt a raw stream-socket descriptor as a nonblocking, close-on-exec trio stream.

    Takes ownership of ``fd``: it is closed if it is not a stream socket (then
    ``OSError`` or ``ValueError`` propagates).
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        close_fd_quietly(fd)
        raise
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"descriptor {fd} is not a stream socket")
        sock.set_inheritable(False)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


async def wait_peer_closed(stream: trio.abc.Stream) -> bool:
    """Wait until the peer of ``stream`` hangs up, without consuming any byte.

    Returns True once the peer has closed (a peek sees end-of-stream or an error)
    and False as soon as data is waiting instead: those bytes belong to whoever
    reads the stream next, so a hang-up behind them cannot be observed without
    taking them. A stream that is not a socket is never reported closed.

    Raises ``trio.ClosedResourceError`` if another task closes the stream meanwhile.

    Cancellation: safe at any point; nothing is read.
    """
    if not isinstance(stream, trio.SocketStream):
        await trio.sleep_forever()
    fd = stream.socket.fileno()
    if fd < 0:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("the stream is closed")
    await trio.lowlevel.wait_readable(fd)
    if stream.socket.fileno() != fd:
        # Closed by another task between the wake-up and now.
        raise trio.ClosedResourceError("the stream was closed while waiting")
    sock = socket.socket(fileno=fd)
    try:
        peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.detach()
    return peeked == b""
