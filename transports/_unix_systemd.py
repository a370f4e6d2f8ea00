"""systemd on Unix: the socket it passes (socket activation) and the state we report to it.

What this module does: ``inherited_listener`` reads ``LISTEN_PID`` / ``LISTEN_FDS``
(the ``sd_listen_fds`` protocol): when they are meant for this process it checks
that descriptor 3 is a listening ``AF_UNIX`` stream socket with a path, makes it
close-on-exec and returns it as a ``UnixListener`` that never removes the socket
file (systemd owns it and keeps listening while the service restarts). It removes
the variables from the environment in every case, so backends never inherit them.
``UnixServiceNotifier`` sends ``READY=1`` / ``STOPPING=1`` / ``STATUS=...`` datagrams
to ``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``), which it also
removes from the environment.

What it does not do: serve more than one inherited socket, accept abstract or
unnamed listening sockets (clients connect by path), check the socket's directory
(systemd creates it; the broker's peer-credential check still drops other users),
watchdog keep-alives, file-descriptor store, or ``MAINPID`` (the broker is the
main process). No library is used: the protocol is a few environment variables and
one datagram per notification.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix_systemd is part of the Unix transport"

import os
import socket
import stat
from collections.abc import MutableMapping

import trio

from transports._interface import NotifyDelivery, SocketActivationError, TransportError
from transports._unix_listen import UnixListener

#: The first passed descriptor (``SD_LISTEN_FDS_START``): systemd passes sockets
#: from 3 upwards, after stdin, stdout and stderr.
LISTEN_FDS_START = 3
#: The pid the passed sockets are meant for.
LISTEN_PID_ENV = "LISTEN_PID"
#: How many sockets were passed.
LISTEN_FDS_ENV = "LISTEN_FDS"
#: Their names (``FileDescriptorName=``); read by nobody here, removed like the rest.
LISTEN_FDNAMES_ENV = "LISTEN_FDNAMES"
#: Where notifications go.
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"

_HOW_TO_FIX = "give the .socket unit exactly one ListenStream=/absolute/path.sock and Accept=no"


def _environment(environ: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    return os.environ if environ is None else environ


def _parse_count(name: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise SocketActivationError(
            f"{name}={text!r} is not a non-negative integer; it is set by systemd: "
            f"unset it when starting rpbroker by hand"
        )
    return int(text)


def inherited_listener(environ: MutableMapping[str, str] | None = None) -> UnixListener | None:
    """The listening socket systemd passed to this process, or ``None`` if none was.

    ``environ`` defaults to ``os.environ``; ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed from it whatever happens. ``None`` when they are
    absent, ``LISTEN_FDS`` is 0, or ``LISTEN_PID`` names another process. Raises
    ``SocketActivationError`` when the variables are malformed, more than one
    socket was passed, or descriptor 3 is not a listening ``AF_UNIX`` stream socket
    bound to a path; the descriptor is then left as it was.
    """
    env = _environment(environ)
    pid_text = env.pop(LISTEN_PID_ENV, None)
    fds_text = env.pop(LISTEN_FDS_ENV, None)
    env.pop(LISTEN_FDNAMES_ENV, None)
    if pid_text is None or fds_text is None:
        return None
    if _parse_count(LISTEN_PID_ENV, pid_text) != os.getpid():
        return None  # meant for another process (we inherited the variables)
    count = _parse_count(LISTEN_FDS_ENV, fds_text)
    if count == 0:
        return None
    if count > 1:
        raise SocketActivationError(
            f"systemd passed {count} sockets (LISTEN_FDS={count}); rpbroker serves exactly "
            f"one: {_HOW_TO_FIX}"
        )
    return _adopt_listener(LISTEN_FDS_START)


def _name(value: int) -> str:
    """An address family or socket type by name (``AF_INET``), else its number."""
    return getattr(value, "name", str(value))


def _adopt_listener(fd: int) -> UnixListener:
    """Wrap passed descriptor ``fd`` as a ``UnixListener`` after checking what it is."""
    where = f"descriptor {fd} passed by systemd (LISTEN_FDS)"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise SocketActivationError(f"{where} is not open ({exc.strerror}); {_HOW_TO_FIX}") from exc
    if not stat.S_ISSOCK(mode):
        raise SocketActivationError(f"{where} is not a socket; {_HOW_TO_FIX}")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketActivationError(f"{where} is not usable ({exc}); {_HOW_TO_FIX}") from exc
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise SocketActivationError(
                f"{where} is a {_name(sock.family)} {_name(sock.type)} socket; rpbroker serves "
                f"an AF_UNIX stream socket: {_HOW_TO_FIX}"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketActivationError(
                f"{where} is not listening (a connection, not a listener); {_HOW_TO_FIX}"
            )
        path = sock.getsockname()
        if not isinstance(path, str) or not path or path.startswith("\0"):
            raise SocketActivationError(
                f"{where} has no file-system path ({path!r}: abstract or unnamed), so clients "
                f"cannot reach it by path; {_HOW_TO_FIX}"
            )
        # systemd passes it inheritable; backends must not inherit the broker's socket.
        os.set_inheritable(fd, False)
        trio_sock = trio.socket.from_stdlib_socket(sock)
    except BaseException:
        sock.detach()  # leave the descriptor open, as it was passed
        raise
    return UnixListener(trio_sock, path, None)


class UnixServiceNotifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET`` (implements ``ServiceNotifier``).

    Build it with ``from_environment``. Each message is one datagram from a fresh,
    nonblocking socket: a service manager that is not reading makes the send fail
    (``TransportError``) instead of blocking the caller's event loop.
    """

    def __init__(self, address: str | None, *, shown_as: str = "") -> None:
        #: The socket address (abstract names start with NUL), or None: no manager.
        self.address = address
        self._shown_as = shown_as or (address or "")

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None
    ) -> UnixServiceNotifier:
        """Read (and remove) ``NOTIFY_SOCKET`` from ``environ`` (default ``os.environ``).

        Unset or empty: a notifier that reports ``NO_SERVICE_MANAGER``. A path must
        be absolute; ``@name`` is an abstract socket. Anything else (for example a
        ``vsock:`` address) raises ``SocketActivationError``.
        """
        raw = _environment(environ).pop(NOTIFY_SOCKET_ENV, None)
        if not raw:
            return cls(None)
        if raw.startswith("@"):
            return cls("\0" + raw[1:], shown_as=raw)
        if raw.startswith("/"):
            return cls(raw)
        raise SocketActivationError(
            f"{NOTIFY_SOCKET_ENV}={raw!r} is neither an absolute socket path nor an abstract "
            f"name (@name); rpbroker supports only those"
        )

    def ready(self, status: str) -> NotifyDelivery:
        return self._send("READY=1", status)

    def stopping(self, status: str) -> NotifyDelivery:
        return self._send("STOPPING=1", status)

    def status(self, status: str) -> NotifyDelivery:
        return self._send(None, status)

    def _send(self, state: str | None, status: str) -> NotifyDelivery:
        if self.address is None:
            return NotifyDelivery.NO_SERVICE_MANAGER
        one_line = " ".join(status.splitlines())
        lines = [state] if state is not None else []
        message = "\n".join([*lines, f"STATUS={one_line}"]).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            raise TransportError(
                f"cannot notify the service manager at {self._shown_as}: {exc.strerror or exc}"
            ) from exc
        return NotifyDelivery.SENT


def service_notifier(environ: MutableMapping[str, str] | None = None) -> UnixServiceNotifier:
    """``UnixServiceNotifier.from_environment``: the notifier for this process."""
    return UnixServiceNotifier.from_environment(environ)
