"""Passing an open connection to another process with ``SCM_RIGHTS``.

What this module does: sends one descriptor together with a 16-byte token in a
single ``sendmsg`` (the token is the data, the descriptor rides in ``SCM_RIGHTS``
on its first byte), waiting for room in the socket buffer instead of failing with
EAGAIN, and maps failures to ``ConnectionPassError`` kinds (facts §3.2). It also
extracts the descriptors from received ancillary data.

What it does not do: frame messages, choose the token, or decide what the
receiver does with the descriptor (``_unix_control`` and the broker do). The
sender keeps its own descriptor; closing it is the caller's business.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_fdpass is part of the Unix transport"

import array
import errno
import socket
from typing import Protocol

import trio

from transports._interface import (
    HANDOFF_TOKEN_BYTES,
    ConnectionPassError,
    PassFailure,
)

#: sendmsg flags: never block (trio waits instead) and, on Linux, report a dead
#: peer as EPIPE rather than raising SIGPIPE. macOS has no MSG_NOSIGNAL for
#: sendmsg; Python ignores SIGPIPE there anyway.
if sys.platform == "linux":
    SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
else:
    SEND_FLAGS = socket.MSG_DONTWAIT

#: Descriptors one received message may carry before the rest is truncated: the
#: protocol sends one; room for a few more lets us close a misbehaving sender's
#: extras instead of losing track of them.
MAX_FDS_PER_MESSAGE = 8

#: Size in bytes of a C int, the unit of an ``SCM_RIGHTS`` payload.
_C_INT_BYTES = array.array("i").itemsize

#: Control buffer size for ``recvmsg``: ``CMSG_SPACE`` of ``MAX_FDS_PER_MESSAGE`` ints.
RECV_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _C_INT_BYTES)

_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
#: EAGAIN/EWOULDBLOCK are waited out; ENOBUFS (kernel memory) has no readiness event.
_WOULD_BLOCK_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_UNAVAILABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


class SendmsgSocket(Protocol):
    """The part of a stdlib socket that ``send_fd_with_token`` uses."""

    def fileno(self) -> int: ...

    def sendmsg(
        self,
        buffers: list[bytes],
        ancdata: list[tuple[int, int, bytes]],
        flags: int,
        /,
    ) -> int: ...


def classify_pass_errno(err: int | None) -> PassFailure:
    """Map a ``sendmsg`` errno to the ``PassFailure`` kind the broker reports."""
    if err in _PERMISSION_ERRNOS:
        return PassFailure.PERMISSION_DENIED
    if err in _WOULD_BLOCK_ERRNOS:
        return PassFailure.WOULD_BLOCK
    if err in _UNAVAILABLE_ERRNOS:
        return PassFailure.BACKEND_UNAVAILABLE
    return PassFailure.FAILED


def check_token(token: bytes) -> None:
    """Raise ``ValueError`` unless ``token`` is exactly ``HANDOFF_TOKEN_BYTES`` bytes."""
    if not isinstance(token, bytes) or len(token) != HANDOFF_TOKEN_BYTES:
        raise ValueError(f"a handoff token must be exactly {HANDOFF_TOKEN_BYTES} bytes")


def connection_fd(connection: trio.abc.Stream) -> int:
    """The descriptor of a ``trio.SocketStream``; ``ConnectionPassError`` otherwise."""
    if not isinstance(connection, trio.SocketStream):
        raise ConnectionPassError(
            PassFailure.FAILED,
            f"only a trio.SocketStream can be passed, got {type(connection).__name__}",
        )
    fd = connection.socket.fileno()
    if fd < 0:
        raise ConnectionPassError(PassFailure.FAILED, "the connection is already closed")
    return fd


async def send_fd_with_token(
    sock: SendmsgSocket,
    fd: int,
    token: bytes,
    *,
    trailer: bytes = b"",
    final_checkpoint: bool = True,
) -> int:
    """Send ``token`` as data with ``fd`` in ``SCM_RIGHTS``, in one ``sendmsg``.

    ``trailer`` (the offer frame that belongs to the descriptor) may ride in the
    same ``sendmsg``, right behind the token: the receiver still finds the
    descriptor at a message boundary and reads the frame after the 16 token
    bytes, but is woken once instead of twice. Returns how many trailer bytes
    went out with it; the caller sends the rest (a stream socket may take a
    short write).

    Waits while the socket buffer is full. Raises ``ValueError`` for a token that
    is not 16 bytes (nothing sent) and ``ConnectionPassError`` otherwise: a send
    shorter than the token is ``PARTIAL_SEND`` with
    ``fd_may_have_reached_backend=True`` (the descriptor travels with the first
    byte); errno failures are classified by ``classify_pass_errno`` and nothing
    reached the receiver.

    Cancellation: safe while waiting for buffer space (nothing has been sent);
    once the ``sendmsg`` succeeded the call completes.
    """
    check_token(token)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    buffers = [token, trailer] if trailer else [token]
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            sent = sock.sendmsg(buffers, ancillary, SEND_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock.fileno())
            continue
        except OSError as exc:
            kind = classify_pass_errno(exc.errno)
            raise ConnectionPassError(
                kind,
                f"sendmsg(SCM_RIGHTS) failed: {exc.strerror or exc}",
                os_error=exc.errno,
            ) from exc
        break
    if sent < HANDOFF_TOKEN_BYTES:
        raise ConnectionPassError(
            PassFailure.PARTIAL_SEND if sent > 0 else PassFailure.FAILED,
            f"sendmsg(SCM_RIGHTS) sent {sent} of {HANDOFF_TOKEN_BYTES} token bytes",
            fd_may_have_reached_backend=sent > 0,
        )
    if final_checkpoint:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return sent - HANDOFF_TOKEN_BYTES


def send_to_fd_now(fd: int, data: bytes | memoryview) -> int:
    """Write as much of ``data`` to the nonblocking stream socket ``fd`` as fits now.

    Returns the number of bytes written, ``0`` when the buffer is full. Raises
    ``trio.BrokenResourceError`` if the peer is gone (``MSG_NOSIGNAL``: a plain
    write(2) would raise SIGPIPE in a process that has not ignored it).
    """
    # Family and type given: a bare socket(fileno=) would ask the kernel for them
    # (three syscalls) on this hot path. Only AF_UNIX stream connections come here.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        return sock.send(data, SEND_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"client connection failed: {exc}") from exc
    finally:
        sock.detach()


async def write_all_to_fd(fd: int, data: bytes) -> None:
    """Write ``data`` to the nonblocking stream socket ``fd``, waiting only when full.

    Used to put a reply on a client connection immediately before passing it, in
    the same scheduler slice when the buffer has room. Raises
    ``trio.BrokenResourceError`` if the peer is gone (``MSG_NOSIGNAL``: no SIGPIPE).

    Cancellation: safe before the first byte; a partial write leaves the
    connection unusable for framing, and the caller must not pass it.
    """
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        written = send_to_fd_now(fd, view[sent:])
        if written == 0:
            await trio.lowlevel.wait_writable(fd)
        sent += written


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """All descriptors carried in ``SCM_RIGHTS`` entries of ``recvmsg`` ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _C_INT_BYTES
            fds.extend(array.array("i", data[:usable]))
    return fds
