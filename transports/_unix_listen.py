"""Listening on a Unix socket path without ever replacing someone else's file.

What this module does: ``open_listener`` binds an ``AF_UNIX`` stream socket at a
path inside a private directory, with the socket file mode 0600. An existing path
is refused (``EndpointInUseError``) unless it is provably a dead socket of ours:
a socket file, owned by the euid, that refuses connections and (on Linux) that no
open socket is bound to; only then it is unlinked (stale cleanup after a crash).
``UnixListener.accept`` yields ``trio.SocketStream`` objects and reports descriptor
exhaustion as ``FdExhaustedError``; ``aclose`` removes the socket file only if it
is still the inode this listener bound. A listener over a socket that another
process bound (socket activation, ``transports._unix_systemd``) never removes the
file. ``remove_stale_backend_endpoints`` applies the same proof of death to every
backend endpoint name of ours in a runtime directory (what a SIGKILLed broker's
backends leave behind) and removes those.

What it does not do: check the credentials of accepted peers (the broker calls
``peer_identity``), read from accepted connections, or retry after EMFILE (the
caller backs off).
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_listen is part of the Unix transport"

import errno
import os
import socket
import stat

import trio

from transports._interface import (
    EndpointInUseError,
    FdExhaustedError,
    TransportError,
)
from transports._unix_paths import check_sun_path, ensure_private_dir, is_backend_endpoint_name

#: Listen backlog (connections): enough for a burst of clients starting at once;
#: the kernel clamps it to ``net.core.somaxconn``.
LISTEN_BACKLOG = 512

#: Mode of a socket file: owner read/write only (connect needs write permission).
SOCKET_FILE_MODE = 0o600

#: umask applied around ``bind`` so the socket file is never created wider than
#: 0600, even for the moment before the explicit ``chmod``. The umask is
#: process-wide; for that instant other threads can only create narrower files.
_BIND_UMASK = 0o177

#: Linux's table of open AF_UNIX sockets with the addresses they are bound to.
_PROC_NET_UNIX = "/proc/net/unix"

#: accept() errors caused by the peer or a signal, not by the listener: retry.
_TRANSIENT_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})

#: accept() errors meaning the process or system is out of descriptors.
_FD_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


class UnixListener:
    """A bound, listening ``AF_UNIX`` stream socket (implements ``Listener``).

    ``inode`` is the (st_dev, st_ino) of the socket file this listener created,
    removed again by ``aclose``; ``None`` for a socket bound by someone else (an
    inherited one), whose file is left alone.
    """

    def __init__(
        self, sock: trio.socket.SocketType, path: str, inode: tuple[int, int] | None
    ) -> None:
        self._sock = sock
        self._path = path
        self._inode = inode
        self._closed = False

    @property
    def path(self) -> str:
        """The socket path this listener bound."""
        return self._path

    def __repr__(self) -> str:
        state = "closed" if self._closed else "listening"
        return f"<UnixListener {self._path!r} {state}>"

    async def accept(self) -> trio.SocketStream:
        """Wait for the next connection and return it as a nonblocking, close-on-exec stream.

        Raises ``FdExhaustedError`` on EMFILE/ENFILE (the pending connection stays
        in the backlog), ``trio.ClosedResourceError`` if the listener is or gets
        closed, ``TransportError`` for other failures. Aborted connections are
        skipped.

        Cancellation: safe at any point; a cancelled accept takes no connection out
        of the backlog.
        """
        while True:
            try:
                conn, _address = await self._sock.accept()
            except OSError as exc:
                if exc.errno in _TRANSIENT_ACCEPT_ERRNOS:
                    continue
                if exc.errno in _FD_EXHAUSTED_ERRNOS:
                    raise FdExhaustedError(
                        f"accept on {self._path} failed: {exc.strerror} (out of file descriptors)"
                    ) from exc
                raise TransportError(f"accept on {self._path} failed: {exc}") from exc
            # Python creates accepted sockets close-on-exec; trio made it nonblocking.
            return trio.SocketStream(conn)

    async def aclose(self) -> None:
        """Stop listening and remove the socket file if this listener created it. Idempotent.

        Cancellation: the listener is closed even if the call is cancelled.
        """
        if not self._closed:
            self._closed = True
            self._sock.close()  # wakes a pending accept with ClosedResourceError
            if self._inode is not None:
                _unlink_if_same_inode(self._path, self._inode)
        await trio.lowlevel.checkpoint()


def _unlink_if_same_inode(path: str, inode: tuple[int, int]) -> bool:
    """Remove ``path`` only if it is still the file identified by (st_dev, st_ino).

    Returns whether this call removed it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if (st.st_dev, st.st_ino) != inode:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _clear_stale_socket(path: str) -> bool:
    """Make ``path`` free for binding or raise ``EndpointInUseError``.

    Removes the path only when it is a socket file owned by the euid that refuses
    connections (ECONNREFUSED: nobody listens). Regular files, symbolic links,
    another user's socket and live sockets are refused without being touched.
    Returns whether a stale socket was removed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise EndpointInUseError(
            f"{path} already exists and is {kind}; refusing to replace it "
            "(remove it if it is not yours)"
        )
    euid = os.geteuid()
    if st.st_uid != euid:
        raise EndpointInUseError(
            f"{path} is a socket owned by uid {st.st_uid}, not by the current user "
            f"(uid {euid}); refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # dead: nobody listens on it
        except BlockingIOError:
            raise EndpointInUseError(
                f"{path} is in use: a live listener with a full backlog"
            ) from None
        except OSError as exc:
            raise EndpointInUseError(
                f"{path} exists and could not be probed ({exc.strerror}); refusing to replace it"
            ) from exc
        else:
            raise EndpointInUseError(f"{path} is in use: another process is listening on it")
    finally:
        probe.close()
    # Refused, but a socket between its bind() and listen() refuses too. Checked
    # after the probe: the file existed before it, so the socket that made it, if
    # still open, is listed now.
    if _bound_by_an_open_socket(path):
        raise EndpointInUseError(
            f"{path} is in use: a live socket is bound to it and not yet listening"
        )
    return _unlink_if_same_inode(path, (st.st_dev, st.st_ino))


def _bound_by_an_open_socket(path: str) -> bool:
    """Linux: whether an open socket of this network namespace is bound to ``path``.

    Read from ``/proc/net/unix``, which lists the address every open ``AF_UNIX``
    socket was bound with (as given to ``bind``: relative addresses are compared
    by name only). Elsewhere, or when the table cannot be read, returns False, so
    the refused connection alone decides.
    """
    if sys.platform != "linux":
        return False
    try:
        with open(_PROC_NET_UNIX, encoding="utf-8", errors="replace") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return False
    name = os.path.basename(path)
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) < 8 or os.path.basename(fields[7]) != name:
            continue
        bound = fields[7]
        if not os.path.isabs(bound) or os.path.realpath(os.path.dirname(bound)) == directory:
            return True
    return False


def remove_stale_backend_endpoints(directory: os.PathLike[str] | str) -> list[str]:
    """Remove the dead backend endpoint sockets of the current user in ``directory``.

    A file is removed only when all of this holds: its name is a backend endpoint
    name of this user (``rpb-v1-<userhash>-be-<32 hex>.sock``), it is a socket file
    (not a link or anything else), it is owned by the euid, and connecting to it
    is refused (nobody listens). Anything else in the directory is left alone,
    including live endpoints of other brokers that share it. Returns the removed
    paths, sorted.

    A socket between its ``bind`` and ``listen`` (a backend of another broker
    sharing the directory, starting now) refuses connections too; on Linux it is
    told apart by ``/proc/net/unix`` and kept. Elsewhere the refusal alone decides,
    and such a socket (a window of microseconds) would lose its name.
    """
    removed: list[str] = []
    with os.scandir(directory) as entries:
        candidates = [entry.path for entry in entries if is_backend_endpoint_name(entry.name)]
    for path in sorted(candidates):
        try:
            if _clear_stale_socket(path):
                removed.append(path)
        except EndpointInUseError:
            continue  # alive, or not provably a dead socket of ours: not ours to remove
    return removed


def clear_stale_endpoint(path: str) -> bool:
    """Make ``path`` free for a backend that binds it itself (a foreign backend).

    Raises ``EndpointNameError`` when ``path`` does not fit ``sun_path``, and
    ``EndpointInUseError`` when something is there that is not provably a dead
    socket of this user: a live listener, another user's socket, a regular file
    or a symbolic link (none is touched). A socket file owned by the euid that
    refuses connections is removed, as ``remove_stale_backend_endpoints`` does.
    Returns whether a stale socket was removed.
    """
    check_sun_path(path)
    return _clear_stale_socket(path)


def _parent_dir(path: str) -> str:
    """The directory that will contain the socket file ``path``."""
    return os.path.dirname(os.path.abspath(path))


def _bind_private(sock: socket.socket, path: str) -> tuple[int, int]:
    """Bind ``sock`` at ``path`` with the socket file created 0600; return its (dev, ino)."""
    old_umask = os.umask(_BIND_UMASK)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


async def open_listener(path: str) -> UnixListener:
    """Bind and listen on ``path``, an ``AF_UNIX`` socket in a private directory.

    The parent directory is created 0700 if missing and must pass
    ``verify_private_dir`` (else ``InsecurePathError``). An existing path raises
    ``EndpointInUseError`` unless it is a dead socket of ours, which is removed.
    Raises ``EndpointNameError`` for a path too long for ``sun_path``.

    Cancellation: a cancelled call binds nothing and leaves no descriptor open;
    once the socket is bound the call completes.
    """
    check_sun_path(path)
    await trio.lowlevel.checkpoint_if_cancelled()
    ensure_private_dir(_parent_dir(path))
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode: tuple[int, int] | None = None
    try:
        try:
            inode = _bind_private(sock, path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EndpointInUseError(
                    f"{path} appeared while binding; refusing to replace it"
                ) from exc
            raise TransportError(f"cannot bind {path}: {exc}") from exc
        os.chmod(path, SOCKET_FILE_MODE)
        sock.listen(LISTEN_BACKLOG)
        trio_sock = trio.socket.from_stdlib_socket(sock)
    except BaseException:
        sock.close()
        if inode is not None:
            _unlink_if_same_inode(path, inode)
        raise
    listener = UnixListener(trio_sock, path, inode)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return listener
