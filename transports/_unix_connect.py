"""Connecting to a Unix socket path: as a trio stream, or blocking for code that is not trio.

What this module does: ``connect`` opens a nonblocking ``AF_UNIX`` stream
connection and maps "nobody listens here" (missing path, refused, reset, not a
socket) to ``EndpointUnavailableError``. When the listener's backlog is full,
Linux refuses a nonblocking connect with EAGAIN and offers no readiness event for
"the backlog has room again"; ``connect`` then retries with a short, capped
back-off for as long as the caller's cancel scope allows. ``connect_blocking`` does
the same with blocking calls and a timeout, in any thread, without a trio run, and
returns a plain ``socket.socket``.

What it does not do: check who listens (callers may use ``peer_identity``), apply
a timeout of its own to ``connect`` (its caller's cancel scope bounds it), or start
a broker when none is running.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_connect is part of the Unix transport"

import errno
import os
import socket
import time

import trio

from transports._interface import EndpointUnavailableError, TransportError
from transports._unix_fds import close_socket_quietly
from transports._unix_paths import check_sun_path

#: connect() errors meaning nothing usable listens at the path.
_UNAVAILABLE_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ENOTSOCK,
    }
)

#: First wait (seconds) before retrying a connect refused with EAGAIN (full backlog).
_BACKLOG_RETRY_FIRST_S = 0.001

#: Longest wait (seconds) between retries: short enough that a freed backlog slot
#: is used promptly, long enough not to spin against an overloaded listener.
_BACKLOG_RETRY_MAX_S = 0.05


def _unavailable(path: str, exc: OSError) -> TransportError:
    if exc.errno in _UNAVAILABLE_ERRNOS:
        return EndpointUnavailableError(f"nothing listens at {path}: {exc.strerror}")
    return TransportError(f"cannot connect to {path}: {exc}")


async def connect(path: str) -> trio.SocketStream:
    """Connect to the ``AF_UNIX`` stream socket at ``path``.

    Raises ``EndpointUnavailableError`` for ENOENT/ENOTDIR/ECONNREFUSED/
    ECONNRESET/ENOTSOCK, ``EndpointNameError`` for a path too long for
    ``sun_path``, ``TransportError`` for anything else (for example EACCES). Waits
    while the listener's backlog is full.

    Cancellation: safe at any point; the socket is closed on failure or
    cancellation, so nothing leaks and no half-made connection is returned.
    """
    check_sun_path(path)
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        delay = _BACKLOG_RETRY_FIRST_S
        while True:
            try:
                sock.connect(path)
            except BlockingIOError as exc:
                if exc.errno == errno.EINPROGRESS:
                    # BSD may complete a local connect asynchronously.
                    await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise _unavailable(path, OSError(err, os.strerror(err))) from None
                    break
                # EAGAIN: the backlog is full; the kernel has no wake-up for us.
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKLOG_RETRY_MAX_S)
            except OSError as exc:
                raise _unavailable(path, exc) from exc
            else:
                break
        trio_sock = trio.socket.from_stdlib_socket(sock)
    except BaseException:
        close_socket_quietly(sock)
        raise
    stream = trio.SocketStream(trio_sock)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return stream


def connect_blocking(path: str, timeout_s: float | None) -> socket.socket:
    """Connect to the ``AF_UNIX`` stream socket at ``path`` with blocking calls.

    Waits at most ``timeout_s`` seconds (``None``: no limit), including while the
    listener's backlog is full, and raises the builtin ``TimeoutError`` after it.
    Otherwise raises what ``connect`` raises. Returns a blocking, close-on-exec
    socket whose timeout is ``timeout_s``. On any failure the socket is closed.
    """
    check_sun_path(path)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        delay = _BACKLOG_RETRY_FIRST_S
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"connecting to {path} timed out (its backlog stayed full)")
            sock.settimeout(remaining)
            try:
                sock.connect(path)
            except BlockingIOError:
                # EAGAIN: the backlog is full (a socket with a timeout connects
                # nonblocking underneath); as in ``connect``, nothing wakes us.
                time.sleep(delay if remaining is None else min(delay, remaining))
                delay = min(delay * 2, _BACKLOG_RETRY_MAX_S)
            except TimeoutError:
                raise
            except OSError as exc:
                raise _unavailable(path, exc) from exc
            else:
                sock.settimeout(timeout_s)
                return sock
    except BaseException:
        sock.close()
        raise
