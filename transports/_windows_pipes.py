"""Listening on and connecting to rpbroker's named pipes.

What this module does: ``PipeListener`` claims a pipe name by creating its first
instance with ``FILE_FLAG_FIRST_PIPE_INSTANCE`` (so an existing pipe of that name,
whoever made it, is refused with ``EndpointInUseError``: pipe squatting), accepts
connections with an overlapped ``ConnectNamedPipe`` on trio's completion port and
keeps one spare instance listening at all times; ``connect_pipe`` opens the client
end with ``CreateFileW`` and retries a busy pipe for a bounded time. Every instance
carries the current-user-only security descriptor, rejects remote clients and is
opened for overlapped I/O.

What it does not do: check who connected (``_windows_security.pipe_peer_identity``
does, and the broker decides), enforce a backlog limit (Windows has none beyond
the instance count), or read a single byte from an accepted connection.
"""

from __future__ import annotations

import logging

import trio

from transports._interface import (
    EndpointInUseError,
    EndpointUnavailableError,
    FdExhaustedError,
    TransportError,
)
from transports._windows_api import (
    ERROR_ACCESS_DENIED,
    ERROR_BAD_PATHNAME,
    ERROR_FILE_NOT_FOUND,
    ERROR_IO_PENDING,
    ERROR_NO_DATA,
    ERROR_NO_SYSTEM_RESOURCES,
    ERROR_NOT_ENOUGH_MEMORY,
    ERROR_OUTOFMEMORY,
    ERROR_PATH_NOT_FOUND,
    ERROR_PIPE_BUSY,
    ERROR_PIPE_CONNECTED,
    ERROR_TOO_MANY_OPEN_FILES,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    FILE_FLAG_OVERLAPPED,
    GENERIC_READ,
    GENERIC_WRITE,
    OPEN_EXISTING,
    OVERLAPPED,
    PIPE_ACCESS_DUPLEX,
    PIPE_READMODE_BYTE,
    PIPE_REJECT_REMOTE_CLIENTS,
    PIPE_TYPE_BYTE,
    PIPE_UNLIMITED_INSTANCES,
    PIPE_WAIT,
    SECURITY_IDENTIFICATION,
    SECURITY_SQOS_PRESENT,
    OverlappedIo,
    Win32Api,
    Win32Error,
)
from transports._windows_names import check_pipe_path
from transports._windows_security import owner_only_descriptor
from transports._windows_stream import PipeStream

logger = logging.getLogger(__name__)

#: Pipe buffer sizes in bytes, per direction. Advisory: Windows grows or shrinks
#: them as needed; 64 KiB holds a typical frame so writes rarely wait for the reader.
PIPE_BUFFER_BYTES = 65536

#: nDefaultTimeOut of CreateNamedPipeW in ms; 0 means the system default (50 ms).
#: It only affects WaitNamedPipe(NMPWAIT_USE_DEFAULT_WAIT), which rpbroker never calls.
PIPE_DEFAULT_TIMEOUT_MS = 0

#: dwOpenMode of every instance (FIRST_PIPE_INSTANCE is added for the first one).
SERVER_OPEN_MODE = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED

#: dwPipeMode of every instance: a byte stream, local clients only.
SERVER_PIPE_MODE = PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS

#: dwFlagsAndAttributes of a client: overlapped I/O, and the server may only
#: identify (never impersonate) the client.
CLIENT_FLAGS = FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION

#: dwDesiredAccess of a client.
CLIENT_ACCESS = GENERIC_READ | GENERIC_WRITE

#: How long ``connect_pipe`` retries while every instance is busy, in seconds. The
#: listener creates the next instance right after each accept, so "busy" is
#: normally gone within milliseconds; a pipe busy for this long is treated as
#: unavailable.
CONNECT_BUSY_TIMEOUT_S = 2.0

#: First and largest pause between busy retries, in seconds (doubling in between).
CONNECT_BUSY_INITIAL_DELAY_S = 0.001
CONNECT_BUSY_MAX_DELAY_S = 0.1

#: CreateNamedPipeW/CreateFileW errors that mean "out of handles or kernel memory".
RESOURCE_ERRORS = frozenset(
    {
        ERROR_TOO_MANY_OPEN_FILES,
        ERROR_NOT_ENOUGH_MEMORY,
        ERROR_OUTOFMEMORY,
        ERROR_NO_SYSTEM_RESOURCES,
    }
)

#: CreateFileW errors that mean nothing (of ours) listens at the path.
_NOT_LISTENING_ERRORS = frozenset({ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND, ERROR_BAD_PATHNAME})


def create_pipe_instance(
    api: Win32Api,
    path: str,
    sid: str,
    *,
    first: bool,
    max_instances: int = PIPE_UNLIMITED_INSTANCES,
) -> int:
    """Create one server instance of ``path`` readable and writable only by ``sid``.

    ``first`` adds FILE_FLAG_FIRST_PIPE_INSTANCE, turning an existing pipe of that
    name into ``EndpointInUseError``. Resource exhaustion is ``FdExhaustedError``;
    other failures are ``TransportError``.
    """
    open_mode = SERVER_OPEN_MODE | (FILE_FLAG_FIRST_PIPE_INSTANCE if first else 0)
    with owner_only_descriptor(api, sid) as descriptor:
        try:
            return api.create_named_pipe(
                path,
                open_mode,
                SERVER_PIPE_MODE,
                max_instances,
                PIPE_BUFFER_BYTES,
                PIPE_BUFFER_BYTES,
                PIPE_DEFAULT_TIMEOUT_MS,
                descriptor,
            )
        except Win32Error as exc:
            if first and exc.code == ERROR_ACCESS_DENIED:
                raise EndpointInUseError(
                    f"{path}: a pipe of this name already exists (another broker, or a "
                    "squatter); refusing to share it"
                ) from exc
            if exc.code in RESOURCE_ERRORS:
                raise FdExhaustedError(f"{path}: cannot create a pipe instance: {exc}") from exc
            raise TransportError(f"{path}: cannot create a pipe instance: {exc}") from exc


class PipeListener:
    """A named-pipe server implementing ``transports.Listener``.

    There is always at most one instance waiting for a client; ``accept`` connects
    it, creates the next one and returns the connected one as a ``PipeStream``.
    """

    def __init__(self, api: Win32Api, io: OverlappedIo, path: str, sid: str) -> None:
        """Claim ``path`` (raises ``EndpointInUseError`` if any pipe has that name)."""
        check_pipe_path(path)
        self._api = api
        self._io = io
        self._path = path
        self._sid = sid
        self._closed = False
        self._accepting = False
        self._pending: int | None = create_pipe_instance(api, path, sid, first=True)
        self._registered = False

    @property
    def path(self) -> str:
        return self._path

    def _take_pending(self) -> int:
        if self._pending is None:
            self._pending = create_pipe_instance(self._api, self._path, self._sid, first=False)
            self._registered = False
        if not self._registered:
            try:
                self._io.register(self._pending)
            except OSError as exc:
                self._api.close_handle_quietly(self._pending)
                self._pending = None
                raise TransportError(
                    f"{self._path}: cannot register a pipe instance with trio: {exc}"
                ) from exc
            self._registered = True
        return self._pending

    def _replace_pending(self) -> None:
        """Swap the waiting instance for a fresh one, creating before closing.

        Creating first keeps the name alive, so no other process can claim it in
        between (its security descriptor already keeps other users from adding
        instances). If the new instance cannot be created, the next ``accept``
        tries again.
        """
        old = self._pending
        self._pending = None
        self._registered = False
        try:
            self._pending = create_pipe_instance(self._api, self._path, self._sid, first=False)
        except TransportError as exc:
            logger.warning("%s: cannot create the next pipe instance: %s", self._path, exc)
        if old is not None:
            self._api.close_handle_quietly(old)

    async def accept(self) -> trio.abc.Stream:
        """Wait for a client and return the connected instance as a ``PipeStream``.

        A client that connected and hung up before we saw it (ERROR_NO_DATA) is
        skipped. Raises ``FdExhaustedError`` when no instance can be created and
        ``trio.ClosedResourceError`` after ``aclose``.

        Cancellation: the pending ConnectNamedPipe is cancelled and the instance is
        replaced by a fresh one, so no half-connected client is left behind; a
        client that connected at the same moment as the cancel is returned (trio
        then raises ``Cancelled`` at the caller's next checkpoint).
        """
        if self._accepting:
            raise trio.BusyResourceError("another task is already accepting")
        self._accepting = True
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the listener is closed")
                handle = self._take_pending()
                overlapped = OVERLAPPED()
                try:
                    connected = await self._connect(handle, overlapped)
                except BaseException:
                    if not self._closed:
                        self._replace_pending()
                    raise
                if not connected:
                    # The client gave up before we accepted it; this instance is dead.
                    self._replace_pending()
                    continue
                self._pending = None
                self._registered = False
                stream = PipeStream(self._api, self._io, handle, server_end=True, register=False)
                try:
                    self._pending = create_pipe_instance(
                        self._api, self._path, self._sid, first=False
                    )
                except TransportError as exc:
                    logger.warning("%s: cannot create the next pipe instance: %s", self._path, exc)
                return stream
        finally:
            self._accepting = False

    async def _connect(self, handle: int, overlapped: OVERLAPPED) -> bool:
        """ConnectNamedPipe on ``handle``; False if the client already hung up."""
        try:
            self._api.connect_named_pipe(handle, overlapped)
        except Win32Error as exc:
            if exc.code == ERROR_PIPE_CONNECTED:
                # Connected between CreateNamedPipeW and now; no completion is queued.
                # Shielded: a connected client is returned, not dropped by a cancel.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return True
            if exc.code == ERROR_NO_DATA:
                await trio.lowlevel.checkpoint()
                return False
            if exc.code != ERROR_IO_PENDING:
                raise TransportError(f"{self._path}: ConnectNamedPipe failed: {exc}") from exc
        # Pending (or completed synchronously, which still queues a packet).
        try:
            await self._io.wait(handle, overlapped)
        except OSError as exc:
            raise TransportError(f"{self._path}: waiting for a client failed: {exc}") from exc
        return True

    async def aclose(self) -> None:
        """Stop listening: close the waiting instance (idempotent).

        Connections already accepted are not touched. The pipe name disappears
        when the last instance (including accepted ones) is closed. Cancellation:
        the instance is closed even if cancelled.
        """
        if not self._closed:
            self._closed = True
            pending, self._pending = self._pending, None
            if pending is not None:
                self._api.close_handle_quietly(pending)
        await trio.lowlevel.checkpoint()


def _unavailable(path: str, detail: str) -> EndpointUnavailableError:
    return EndpointUnavailableError(f"{path}: {detail}")


async def connect_pipe(
    api: Win32Api,
    io: OverlappedIo,
    path: str,
    *,
    busy_timeout_s: float = CONNECT_BUSY_TIMEOUT_S,
) -> PipeStream:
    """Open the client end of ``path`` and return it as a ``PipeStream``.

    ERROR_FILE_NOT_FOUND (and friends) is ``EndpointUnavailableError``;
    ERROR_PIPE_BUSY is retried with a doubling pause for ``busy_timeout_s`` and then
    becomes ``EndpointUnavailableError``; ERROR_ACCESS_DENIED (a pipe of another
    user, e.g. a squatter) is a plain ``TransportError``, like EACCES on Unix.

    Cancellation: the retry pauses are ``trio.sleep``; CreateFileW itself does not
    block. Nothing is left open when cancelled.
    """
    check_pipe_path(path)
    deadline = trio.current_time() + busy_timeout_s
    delay = CONNECT_BUSY_INITIAL_DELAY_S
    while True:
        try:
            handle = api.create_file(path, CLIENT_ACCESS, 0, OPEN_EXISTING, CLIENT_FLAGS)
        except Win32Error as exc:
            if exc.code in _NOT_LISTENING_ERRORS:
                raise _unavailable(path, "no such pipe (nothing listens there)") from exc
            if exc.code == ERROR_ACCESS_DENIED:
                raise TransportError(
                    f"{path}: access denied (the pipe belongs to another user)"
                ) from exc
            if exc.code in RESOURCE_ERRORS:
                raise FdExhaustedError(f"{path}: cannot open the pipe: {exc}") from exc
            if exc.code != ERROR_PIPE_BUSY:
                raise TransportError(f"{path}: cannot open the pipe: {exc}") from exc
            now = trio.current_time()
            if now >= deadline:
                raise _unavailable(
                    path, f"every pipe instance stayed busy for {busy_timeout_s:g} s"
                ) from exc
            await trio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, CONNECT_BUSY_MAX_DELAY_S)
            continue
        try:
            return PipeStream(api, io, handle, server_end=False)
        except BaseException:
            api.close_handle_quietly(handle)
            raise
