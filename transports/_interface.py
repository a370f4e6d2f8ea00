"""The platform-neutral contract every transport implements.

What this module does: names the types and signatures that ``rpbroker`` uses to
reach the operating system's local IPC: endpoints (listen/connect), the kernel's
view of a peer, passing an open connection to another process, the control
channel between the broker and a backend it spawned, and the lifetime of that
child process.

What it does not do: implement any of it. ``transports._unix`` (AF_UNIX,
``SCM_RIGHTS``, ``SO_PEERCRED``) and ``transports._windows`` (named pipes,
``DuplicateHandle``, job objects through ctypes) do; ``transports/__init__.py`` picks
one. Nothing here knows protobuf: control-channel messages are opaque v1 frames
(one framing byte, a u32 little-endian length, the body) and the transport only
reads their 5-byte header to find message boundaries.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
import trio

#: Length of a one-time handoff token in bytes (128 bits).
HANDOFF_TOKEN_BYTES = 16

#: Size of a v1 frame header: framing byte ``0x01`` plus a u32 LE body length.
FRAME_HEADER_BYTES = 5

#: The v1 framing byte.
FRAMING_BYTE = 0x01

#: Environment variable through which a spawned backend finds its control channel.
CONTROL_CHANNEL_ENV = "RPBROKER_CONTROL_CHANNEL"


class TransportError(Exception):
    """Base class of every error raised by a transport."""


class InsecurePathError(TransportError):
    """A runtime directory or endpoint path failed the ownership/mode checks.

    The message names the path, what is wrong, and how to fix it.
    """

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix}")
        self.path = path
        self.problem = problem
        self.fix = fix


class EndpointNameError(TransportError):
    """An endpoint name is invalid or the resulting path exceeds the platform limit."""


class RuntimeDirTooLongError(EndpointNameError):
    """Backend endpoints in a runtime directory would exceed the platform's path limit.

    Every backend endpoint name has the same length, so one directory either fits
    all of them or none. The byte counts say by how much it misses.
    """

    def __init__(
        self,
        directory: str,
        *,
        directory_bytes: int,
        endpoint_bytes: int,
        limit_bytes: int,
        max_directory_bytes: int,
    ) -> None:
        super().__init__(
            f"runtime directory {directory} is {directory_bytes} bytes long, so backend "
            f"endpoints in it would be {endpoint_bytes} bytes, more than the {limit_bytes}-byte "
            f"socket path limit (sun_path) of this platform; use a runtime directory of at most "
            f"{max_directory_bytes} bytes"
        )
        self.directory = directory
        self.directory_bytes = directory_bytes
        self.endpoint_bytes = endpoint_bytes
        self.limit_bytes = limit_bytes
        self.max_directory_bytes = max_directory_bytes


class EndpointInUseError(TransportError):
    """Binding refused: the path exists and is not provably a dead socket of ours."""


class EndpointUnavailableError(TransportError):
    """Connecting failed: nothing listens at the endpoint (missing, refused, reset)."""


class PlatformUnsupportedError(TransportError, NotImplementedError):
    """This platform's transport cannot do what was asked; the message says why."""


class SocketActivationError(TransportError):
    """The service manager's environment (``LISTEN_*``, ``NOTIFY_SOCKET``) cannot be used.

    The message names the variable or descriptor, what is wrong and the fix.
    """


class NotifyDelivery(enum.Enum):
    """What became of a service-manager notification."""

    #: Handed to the service manager's notification socket.
    SENT = "sent"
    #: No service manager listens (``NOTIFY_SOCKET`` unset, or not on this platform).
    NO_SERVICE_MANAGER = "no-service-manager"


class FdExhaustedError(TransportError):
    """``accept`` failed with EMFILE/ENFILE: the process or system is out of descriptors."""


class ChannelClosedError(TransportError):
    """The control channel's peer went away (EOF or reset)."""


class ChannelProtocolError(TransportError):
    """The control channel carried bytes that are not a well-formed message."""


class PeerNotAllowedError(TransportError):
    """The peer of a connection is not the current user."""


class ProcessGoneError(TransportError):
    """No process with that pid exists (any more), so there is nothing to inspect."""


class HostFactUnavailableError(TransportError):
    """This platform (or this process's permissions) cannot report the fact asked for."""


class PassFailure(enum.Enum):
    """Why passing a connection to another process failed (facts §3.2, §3.7)."""

    PERMISSION_DENIED = "permission-denied"
    WOULD_BLOCK = "would-block"
    BACKEND_UNAVAILABLE = "backend-unavailable"
    PARTIAL_SEND = "partial-send"
    FAILED = "failed"


class ConnectionPassError(TransportError):
    """Passing a connection failed.

    ``fd_may_have_reached_backend`` is true when the receiving process may already
    hold a duplicate (a partial ``sendmsg`` of at least one byte on Unix; a
    successful ``DuplicateHandle`` followed by a later failure on Windows, in which
    case ``leaked_handle`` is the handle value now in the receiver's table).
    """

    def __init__(
        self,
        kind: PassFailure,
        detail: str,
        *,
        os_error: int | None = None,
        fd_may_have_reached_backend: bool = False,
        leaked_handle: int | None = None,
    ) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.os_error = os_error
        self.fd_may_have_reached_backend = fd_may_have_reached_backend
        self.leaked_handle = leaked_handle


@attrs.frozen
class PeerIdentity:
    """Who is on the other end of a local connection, as the kernel says.

    ``pid`` is 0 where the platform cannot tell (macOS ``getpeereid``).
    ``user`` is the euid as a decimal string on Unix and the SID string on Windows.
    """

    pid: int
    user: str


@attrs.frozen
class PassReceipt:
    """What a successful ``pass_connection`` produced.

    ``handle_value`` goes into ``HandoffOffer.handle_value``: 0 on Unix (the fd
    travels inside the ``SCM_RIGHTS`` message), the duplicated HANDLE on Windows.
    ``duplicated_handle`` is the handle that now sits in the receiver's table and
    would leak if the handoff later fails (Windows only; ``None`` on Unix).
    """

    handle_value: int
    duplicated_handle: int | None


@attrs.frozen(repr=False)
class PassedConnection:
    """A connection received from another process, with the token that came with it.

    On Unix ``token`` is the 16 ``SCM_RIGHTS`` data bytes. On Windows it is the token
    the caller supplied to ``adopt_handle_value`` (it travels only in the offer).
    The receiver owns ``stream`` and must close it if it does not adopt it.
    """

    token: bytes
    stream: trio.abc.Stream

    def __repr__(self) -> str:
        return f"PassedConnection(token=<redacted>, stream={self.stream!r})"


@attrs.frozen
class ReceivedMessage:
    """One framed message from a control channel.

    ``framed`` is the whole v1 frame (header and body). ``passed`` is the connection
    that arrived immediately before this message on Unix (the ``SCM_RIGHTS`` token
    packet precedes its ``HandoffOffer`` frame); it is always ``None`` on Windows,
    where the receiver calls ``adopt_handle_value`` with the offer's handle value.
    """

    framed: bytes
    passed: PassedConnection | None


class Listener(Protocol):
    """A bound local endpoint yielding trio streams.

    ``accept`` raises ``FdExhaustedError`` on EMFILE/ENFILE (the caller decides how to
    back off) and never returns a half-open stream. ``aclose`` stops listening and
    removes the socket file; it is idempotent.
    """

    @property
    def path(self) -> str: ...

    async def accept(self) -> trio.abc.Stream: ...

    async def aclose(self) -> None: ...


class ServiceNotifier(Protocol):
    """Tells the service manager (systemd's ``sd_notify`` protocol) how the service is doing.

    Each call sends one message and returns at once; it raises ``TransportError``
    when the service manager's socket refuses it. ``status`` is free text (newlines
    become spaces).
    """

    def ready(self, status: str) -> NotifyDelivery:
        """``READY=1`` with a ``STATUS=`` line: the service accepts work now."""
        ...

    def stopping(self, status: str) -> NotifyDelivery:
        """``STOPPING=1`` with a ``STATUS=`` line: shutdown has begun."""
        ...

    def status(self, status: str) -> NotifyDelivery:
        """A ``STATUS=`` line alone."""
        ...


class ControlChannel(Protocol):
    """A persistent, bidirectional, message-oriented channel between two processes.

    One task may send while another receives. Concurrent senders are serialized by
    the channel so messages never interleave. ``pass_connection`` and the message
    sent right after it with ``send_message`` are ordered as sent.

    Cancellation: every method may be cancelled. A cancelled ``receive_message``
    leaves the channel usable only if it had not consumed part of a message;
    callers treat a cancelled receive as the end of the channel. A cancelled
    ``pass_connection`` closes nothing of the caller's.
    """

    async def send_message(self, framed: bytes) -> None:
        """Send one complete v1 frame. Raises ``ChannelClosedError`` if the peer is gone."""
        ...

    async def pass_connection(self, connection: trio.abc.Stream, token: bytes) -> PassReceipt:
        """Give the receiving process a duplicate of ``connection`` together with ``token``.

        Unix: exactly one ``sendmsg`` whose data is the 16 token bytes with the
        connection's fd in ``SCM_RIGHTS``. Windows: ``OpenProcess`` +
        ``DuplicateHandle`` into the peer process. The caller keeps its own copy
        and must close it. Raises ``ConnectionPassError``.
        """
        ...

    async def pass_connection_then_send(
        self,
        connection: trio.abc.Stream,
        token: bytes,
        build_framed: Callable[[PassReceipt], bytes],
        *,
        preface: bytes = b"",
    ) -> PassReceipt:
        """Write ``preface`` on ``connection``, pass it with ``token``, then send one frame.

        The frame is built from the receipt (Windows needs the duplicated handle
        value in the offer) and is sent with no other sender in between, so the
        receiver pairs it with the passed connection. ``preface`` precedes anything
        the receiver writes on the connection. Raises ``trio.BrokenResourceError``
        if the preface cannot be written (nothing passed) and
        ``ConnectionPassError`` for any later failure (with
        ``fd_may_have_reached_backend`` set once the connection has left).
        """
        ...

    async def receive_message(self, max_body: int) -> ReceivedMessage:
        """Receive the next framed message (body at most ``max_body`` bytes).

        Raises ``ChannelClosedError`` at EOF and ``ChannelProtocolError`` for a bad
        framing byte, an oversize length, or a token packet of the wrong size.
        """
        ...

    def adopt_handle_value(self, handle_value: int, token: bytes) -> PassedConnection | None:
        """Turn a handle value from a ``HandoffOffer`` into a stream (Windows).

        Returns ``None`` on Unix, where connections arrive with ``receive_message``.
        """
        ...

    @property
    def peer_pid(self) -> int:
        """The pid of the process at the other end (0 when unknown)."""
        ...

    async def aclose(self) -> None: ...


class ChildControl(Protocol):
    """The child's end of a control channel, prepared before spawning.

    ``env`` must be merged into the child's environment; ``spawn_child`` consumes the
    rest. After the spawn (successful or not) the parent's copy is closed by
    ``spawn_child``; ``close`` is for the case where no spawn happens.
    """

    @property
    def env(self) -> Mapping[str, str]: ...

    def close(self) -> None: ...


@attrs.frozen
class ChildOutput:
    """The broker's read ends of a child's stdout and stderr (``spawn_child(capture_output=True)``).

    Whoever takes them must read them until end of file (a pipe nobody reads
    blocks the child once full) and close them.
    """

    stdout: trio.abc.ReceiveStream
    stderr: trio.abc.ReceiveStream


class ChildProcess(Protocol):
    """A backend process spawned by ``spawn_child``.

    The child is in its own process group (Unix) or job object (Windows) and dies
    with the parent (Linux ``PR_SET_PDEATHSIG``; Windows kill-on-close job), and so
    does the rest of its group, even when the parent is SIGKILLed (Unix: a reaper
    process). On Unix the group also goes when the child itself exits: it is
    SIGKILLed when the exit is noticed, before the child is reaped.
    """

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def output(self) -> ChildOutput | None:
        """Its captured stdout and stderr, or ``None`` (not captured, or not on this platform)."""
        ...

    async def wait(self) -> int:
        """Wait for the child to exit and return its exit status.

        Cancellation: cancelling the wait does not touch the child.
        """
        ...

    def terminate_tree(self) -> None:
        """Ask the child and its group to stop (SIGTERM to the group). Idempotent."""
        ...

    def kill_tree(self) -> None:
        """Kill the child and its whole group (SIGKILL / TerminateJobObject). Idempotent."""
        ...


class SpawnError(TransportError):
    """The child could not be started (missing executable, permission, ...)."""
