"""The kernel's view of who is at the other end of a Unix stream socket.

What this module does: reads the peer credentials the kernel recorded when the
connection was made: Linux ``SO_PEERCRED`` (pid, uid, gid) and macOS/BSD
``LOCAL_PEERCRED`` (uid) plus ``LOCAL_PEERPID`` where available, and reports them
as a ``PeerIdentity`` (euid as a decimal string, pid 0 when unknown).

What it does not do: decide whether a peer is allowed (the broker compares the
identity with ``current_user()``), or read any byte from the connection.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_peer is part of the Unix transport"

import socket
import struct

import trio

from transports._interface import PeerIdentity, TransportError

#: ``struct ucred`` on Linux: pid_t pid, uid_t uid, gid_t gid (three C ints).
_UCRED = struct.Struct("3i")

#: macOS/BSD socket option level for local-domain options (``SOL_LOCAL`` in
#: <sys/un.h>; Python does not export it).
_SOL_LOCAL = 0

#: ``LOCAL_PEERCRED`` in <sys/un.h>: returns a ``struct xucred``.
_LOCAL_PEERCRED = 0x001

#: ``LOCAL_PEERPID`` in <sys/un.h> (macOS 10.8+): returns the peer's pid_t.
_LOCAL_PEERPID = 0x002

#: Leading fields of ``struct xucred``: u_int cr_version, uid_t cr_uid.
_XUCRED_HEAD = struct.Struct("=Ii")

#: Full size of ``struct xucred``: version, uid, short ngroups (+2 padding),
#: gid_t groups[16] (NGROUPS = 16).
_XUCRED_SIZE = 4 + 4 + 4 + 16 * 4

#: ``XUCRED_VERSION`` from <sys/ucred.h>.
_XUCRED_VERSION = 0


def socket_peer_identity(sock: socket.socket | trio.socket.SocketType) -> PeerIdentity:
    """The kernel's peer credentials of a connected ``AF_UNIX`` socket.

    Raises ``TransportError`` when the socket is not a Unix socket or the kernel
    refuses the query (for example, the socket is not connected).
    """
    if sock.family != socket.AF_UNIX:
        raise TransportError(f"peer identity needs an AF_UNIX socket, got family {sock.family}")
    try:
        if sys.platform == "linux":
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, _gid = _UCRED.unpack(raw)
            return PeerIdentity(pid=pid, user=str(uid))
        raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE)
        version, uid = _XUCRED_HEAD.unpack_from(raw)
        if version != _XUCRED_VERSION:
            raise TransportError(f"unexpected struct xucred version {version}")
        try:
            pid = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID)
        except OSError:
            pid = 0  # older kernels: the platform cannot tell
        return PeerIdentity(pid=pid, user=str(uid))
    except OSError as exc:
        raise TransportError(f"cannot read the peer's credentials: {exc}") from exc


def peer_identity(stream: trio.abc.Stream) -> PeerIdentity:
    """Who is at the other end of ``stream``, as the kernel recorded it at connect time.

    ``stream`` must be a ``trio.SocketStream`` over an ``AF_UNIX`` socket (what
    ``Listener.accept`` and ``connect`` return); anything else raises
    ``TransportError``. Reads no data.
    """
    if not isinstance(stream, trio.SocketStream):
        raise TransportError(
            f"peer identity needs a trio.SocketStream, got {type(stream).__name__}"
        )
    return socket_peer_identity(stream.socket)
