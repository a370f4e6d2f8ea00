"""The Windows transport: named pipes, DuplicateHandle and job objects through ctypes.

What this module does: exposes the Windows implementation of the transport
contract (``transports._interface``) under the names ``transports/__init__.py``
imports on win32. The work is done by one module per concept:

- ``_windows_api``: ctypes declarations and the injectable ``Win32Api`` object;
- ``_windows_names`` / ``_windows_dirs``: pipe names, the user hash, the runtime
  directory;
- ``_windows_files``: reading a small file that must not be a link;
- ``_windows_security``: SIDs, the current-user-only security descriptor, peers;
- ``_windows_stream`` / ``_windows_pipes``: the pipe stream, listener and connect;
- ``_windows_passing``: DuplicateHandle into a backend and adoption there;
- ``_windows_channel``: the inherited control pipe;
- ``_windows_process``: spawning into a kill-on-close job object;
- test doubles (fake DLLs, IOCP, Popen) live in ``tests/transports/windows_fakes.py``.

``WindowsTransport`` binds those to one ``Win32Api`` and one ``OverlappedIo``; the
module-level functions use a default instance built from the real DLLs on first
use. Tests build a ``WindowsTransport`` over fakes, or install one with
``set_default_transport``.

What it does not do: work anywhere but Windows without an injected API: there the
module imports cleanly, but the functions that need Win32 raise
``TransportError("Windows transport used on a non-Windows platform")``. It has
never run on a real Windows machine (see ``transports/WINDOWS.md``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

import trio

from transports._interface import (
    CONTROL_CHANNEL_ENV,
    ChildControl,
    EndpointNameError,
    Listener,
    NotifyDelivery,
    PeerIdentity,
    PlatformUnsupportedError,
    TransportError,
)
from transports._windows_api import OverlappedIo, TrioOverlappedIo, Win32Api, load_win32_api
from transports._windows_channel import (
    PipeChildControl,
    PipeControlChannel,
    create_control_pair,
    open_inherited_channel,
)
from transports._windows_dirs import (
    ensure_private_dir,
    mode_is_private,
    runtime_dir,
    short_temp_dir,
    verify_private_dir,
)
from transports._windows_files import read_private_file
from transports._windows_names import broker_pipe_path, random_pipe_path, user_hash_of
from transports._windows_pipes import PipeListener, connect_pipe
from transports._windows_process import (
    JobChildProcess,
    PopenFactory,
    popen_with_handle_list,
    spawn_job_child,
)
from transports._windows_security import current_process_sid, pipe_peer_identity
from transports._windows_stream import PipeStream

#: Name of this transport, for logs and diagnostics.
PLATFORM_NAME = "windows"


class WindowsTransport:
    """The Windows transport bound to one ``Win32Api``, ``OverlappedIo`` and process starter.

    The current user's SID is read once, on first use, and cached.
    """

    def __init__(
        self,
        api: Win32Api,
        io: OverlappedIo | None = None,
        *,
        popen_factory: PopenFactory = popen_with_handle_list,
    ) -> None:
        self.api = api
        self.io: OverlappedIo = TrioOverlappedIo() if io is None else io
        self._popen_factory = popen_factory
        self._sid: str | None = None

    def current_user(self) -> str:
        """The current user's SID string (what ``PeerIdentity.user`` reports)."""
        if self._sid is None:
            self._sid = current_process_sid(self.api)
        return self._sid

    def user_hash(self) -> str:
        """16 lowercase hex characters of sha256 of the current user's SID."""
        return user_hash_of(self.current_user())

    def broker_endpoint(
        self, kind: str = "shared", name: str | None = None, *, directory: Path | None = None
    ) -> str:
        """``\\\\.\\pipe\\rpb-v1-<userhash>-shared`` / ``-svc-<name>`` / ``-inst-<name>``.

        ``directory`` is accepted for signature compatibility and ignored: pipes
        live in the pipe namespace. Raises ``EndpointNameError``.
        """
        del directory
        return broker_pipe_path(self.user_hash(), kind, name)

    def new_backend_endpoint(self, directory: Path | None = None) -> str:
        """A fresh ``\\\\.\\pipe\\rpb-v1-<userhash>-be-<32 hex>`` (``directory`` is ignored).

        Uniqueness comes from the 128 random bits and, at bind time, from
        FILE_FLAG_FIRST_PIPE_INSTANCE.
        """
        del directory
        return random_pipe_path(self.user_hash(), "be")

    async def open_listener(self, path: str) -> PipeListener:
        """Claim the pipe name ``path`` and listen on it.

        Raises ``EndpointInUseError`` if a pipe of that name exists,
        ``EndpointNameError`` for a bad path. Cancellation: a cancelled call
        creates nothing; once the first instance exists the call completes.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        listener = PipeListener(self.api, self.io, path, self.current_user())
        await trio.lowlevel.cancel_shielded_checkpoint()
        return listener

    async def connect(self, path: str) -> PipeStream:
        """Connect to the pipe at ``path`` (see ``_windows_pipes.connect_pipe``).

        Cancellation: safe at any point; nothing is left open.
        """
        return await connect_pipe(self.api, self.io, path)

    def peer_identity(self, stream: trio.abc.Stream) -> PeerIdentity:
        """Pid and SID of the process at the other end of a ``PipeStream``.

        Raises ``TransportError`` for any other stream or when the peer cannot be
        inspected. Reads no data.
        """
        if not isinstance(stream, PipeStream):
            raise TransportError(
                f"peer identity needs a named-pipe stream, got {type(stream).__name__}"
            )
        return pipe_peer_identity(self.api, stream)

    def open_control_pair(self) -> tuple[PipeControlChannel, PipeChildControl]:
        """The broker's control channel and the child's end to give ``spawn_child``."""
        return create_control_pair(self.api, self.io, self.user_hash(), self.current_user())

    async def open_inherited_control_channel(
        self, environ: Mapping[str, str] | None = None
    ) -> PipeControlChannel:
        """Adopt the control pipe handle this process inherited from ``spawn_child``.

        Reads ``RPBROKER_CONTROL_CHANNEL`` (``handle:<n>``) from ``environ`` (default
        ``os.environ``, from which the variable is then removed so grandchildren do
        not see it). Raises ``TransportError``.

        Cancellation: a cancelled call adopts nothing and leaves the environment as
        it was.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        source: Mapping[str, str] = os.environ if environ is None else environ
        channel = await open_inherited_channel(self.api, self.io, source)
        if environ is None:
            os.environ.pop(CONTROL_CHANNEL_ENV, None)
        return channel

    async def spawn_child(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        control: ChildControl,
        *,
        cwd: str | None = None,
        capture_output: bool = False,
    ) -> JobChildProcess:
        """Start a backend in a kill-on-close job (see ``_windows_process.spawn_job_child``).

        ``capture_output`` is accepted and ignored: on Windows the backend inherits
        the broker's stdout and stderr (its ``output`` is ``None``).

        Cancellation: if cancelled before the spawn, nothing is started (the
        control end is still closed); once the child exists the call completes.
        """
        return await spawn_job_child(
            self.api, argv, env, control, cwd=cwd, popen_factory=self._popen_factory
        )


_default: WindowsTransport | None = None


def default_transport() -> WindowsTransport:
    """The process-wide transport over the real DLLs (built on first use).

    Raises ``TransportError`` on a non-Windows platform unless a transport was
    installed with ``set_default_transport``.
    """
    global _default
    if _default is None:
        _default = WindowsTransport(load_win32_api())
    return _default


def set_default_transport(transport: WindowsTransport | None) -> None:
    """Install the transport the module-level functions use (``None``: the real one)."""
    global _default
    _default = transport


def current_user() -> str:
    """The current user's SID string."""
    return default_transport().current_user()


def user_hash() -> str:
    """16 lowercase hex characters identifying the current user in pipe names."""
    return default_transport().user_hash()


def broker_endpoint(
    kind: str = "shared", name: str | None = None, *, directory: Path | None = None
) -> str:
    """The pipe path of a broker endpoint (see ``WindowsTransport.broker_endpoint``)."""
    return default_transport().broker_endpoint(kind, name, directory=directory)


def new_backend_endpoint(directory: Path | None = None) -> str:
    """A fresh backend pipe path (see ``WindowsTransport.new_backend_endpoint``)."""
    return default_transport().new_backend_endpoint(directory)


async def open_listener(path: str) -> PipeListener:
    """Claim and listen on a pipe name. Cancellation: see ``WindowsTransport.open_listener``."""
    return await default_transport().open_listener(path)


async def connect(path: str) -> PipeStream:
    """Connect to a pipe. Cancellation: safe at any point; nothing is left open."""
    return await default_transport().connect(path)


def connect_blocking(path: str, timeout_s: float | None) -> socket.socket:
    """Not available on Windows: always raises ``PlatformUnsupportedError``.

    The blocking client returns a ``socket.socket``, and Windows endpoints are
    named pipes, which are file handles, not sockets; wrapping a pipe in an object
    that only looks like a socket is not done. Use ``rpbroker.connect`` from trio
    (``trio.run`` or ``trio.from_thread``) instead.
    """
    del timeout_s
    raise PlatformUnsupportedError(
        f"blocking connect to {path} is not available on Windows: endpoints are named "
        "pipes, not sockets; use rpbroker.connect from a trio run instead"
    )


def inherited_listener(environ: MutableMapping[str, str] | None = None) -> Listener | None:
    """No socket activation on Windows: always ``None`` (``environ`` is not read)."""
    del environ
    return None


class NoServiceManager:
    """A ``ServiceNotifier`` for Windows: every call reports ``NO_SERVICE_MANAGER``.

    Windows services report to the Service Control Manager through an API this
    transport does not implement; a broker run as a Windows service reports nothing.
    """

    def ready(self, status: str) -> NotifyDelivery:
        return NotifyDelivery.NO_SERVICE_MANAGER

    def stopping(self, status: str) -> NotifyDelivery:
        return NotifyDelivery.NO_SERVICE_MANAGER

    def status(self, status: str) -> NotifyDelivery:
        return NotifyDelivery.NO_SERVICE_MANAGER


def service_notifier(environ: MutableMapping[str, str] | None = None) -> NoServiceManager:
    """The (no-op) notifier for this process; ``environ`` is not read."""
    del environ
    return NoServiceManager()


def peer_identity(stream: trio.abc.Stream) -> PeerIdentity:
    """Pid and SID of the process at the other end of a pipe stream."""
    return default_transport().peer_identity(stream)


def open_control_pair() -> tuple[PipeControlChannel, PipeChildControl]:
    """The broker's control channel and the child's end to give ``spawn_child``."""
    return default_transport().open_control_pair()


async def open_inherited_control_channel(
    environ: Mapping[str, str] | None = None,
) -> PipeControlChannel:
    """Adopt the inherited control pipe. Cancellation: a cancelled call adopts nothing."""
    return await default_transport().open_inherited_control_channel(environ)


async def spawn_child(
    argv: Sequence[str],
    env: Mapping[str, str],
    control: ChildControl,
    *,
    cwd: str | None = None,
    capture_output: bool = False,
) -> JobChildProcess:
    """Start a backend in a kill-on-close job. Cancellation: see ``WindowsTransport``."""
    return await default_transport().spawn_child(
        argv, env, control, cwd=cwd, capture_output=capture_output
    )


def check_backend_endpoint_room(directory: os.PathLike[str] | str) -> None:
    """Nothing to check: pipe names live in the pipe namespace and have a fixed length."""
    del directory


#: Longest pipe name Windows accepts, characters (``CreateNamedPipe``: 256).
_PIPE_NAME_MAX_CHARS = 256


def check_endpoint_name(path: str) -> None:
    """Raise ``EndpointNameError`` when a pipe name is longer than Windows allows."""
    if len(path) > _PIPE_NAME_MAX_CHARS:
        raise EndpointNameError(
            f"pipe name {path!r} is {len(path)} characters; the limit is "
            f"{_PIPE_NAME_MAX_CHARS}: use a shorter endpoint"
        )


def clear_stale_endpoint(path: str) -> bool:
    """Check a foreign backend's pipe name; nothing is ever stale (pipes leave no file).

    Raises ``EndpointNameError`` when the name is longer than Windows allows.
    Returns False: there is never anything to remove.
    """
    check_endpoint_name(path)
    return False


def remove_stale_backend_endpoints(directory: os.PathLike[str] | str) -> list[str]:
    """Always empty: a named pipe disappears with its last handle, nothing is left behind."""
    del directory
    return []


def open_fd_count() -> int | None:
    """Always ``None``: Windows has no per-process descriptor count rpbroker can use.

    (GetProcessHandleCount exists but counts every kernel handle, not the
    resource that runs out when accepting pipes.)
    """
    return None


def fd_usage_ratio() -> float | None:
    """Always ``None`` on Windows (see ``open_fd_count``)."""
    return None


def open_fds() -> dict[int, str] | None:
    """Always ``None``: Windows processes hold handles, not descriptors to list."""
    return None


def child_processes() -> dict[int, str] | None:
    """Always ``None``: listing children needs a process snapshot this transport does not take.

    (Backends live in kill-on-close job objects, so none outlives the broker.)
    """
    return None


__all__ = [
    "PLATFORM_NAME",
    "JobChildProcess",
    "PipeChildControl",
    "PipeControlChannel",
    "PipeListener",
    "PipeStream",
    "WindowsTransport",
    "broker_endpoint",
    "child_processes",
    "check_backend_endpoint_room",
    "check_endpoint_name",
    "clear_stale_endpoint",
    "close_now",
    "connect",
    "connect_blocking",
    "NoServiceManager",
    "current_user",
    "default_transport",
    "inherited_listener",
    "ensure_private_dir",
    "new_backend_endpoint",
    "open_control_pair",
    "fd_usage_ratio",
    "open_fd_count",
    "open_fds",
    "open_inherited_control_channel",
    "open_listener",
    "peer_identity",
    "read_private_file",
    "receive_now",
    "remove_stale_backend_endpoints",
    "runtime_dir",
    "send_now",
    "service_notifier",
    "set_default_transport",
    "short_temp_dir",
    "spawn_child",
    "user_hash",
    "mode_is_private",
    "verify_private_dir",
    "wait_peer_closed",
]


def receive_now(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """Not available on named pipes here: always ``None`` (nothing taken).

    The broker then reads the Hello in the connection's task, as it would anyway.
    """
    return None


def send_now(stream: trio.abc.Stream, data: bytes) -> int:
    """Not available on named pipes here: always ``0`` (nothing written)."""
    return 0


def close_now(stream: trio.abc.Stream) -> bool:
    """Not available on named pipes here: always ``False`` (use ``aclose``)."""
    return False


async def wait_peer_closed(stream: trio.abc.Stream) -> bool:
    """Not observable without reading on a named pipe here: waits forever.

    Callers bound their waits by their own deadlines, so this only means a client
    that leaves while its Hello waits is noticed at the deadline, not at once.
    Cancellation: safe (only waits).
    """
    await trio.sleep_forever()
    raise AssertionError("unreachable")
