"""A trio stream over one end of a Windows named pipe opened for overlapped I/O.

What this module does: ``PipeStream`` owns one pipe HANDLE, registers it with
trio's I/O completion port when it is created, reads with ``ReadFile`` and writes
with ``WriteFile`` through trio's overlapped primitives, maps the "other end went
away" errors to end-of-stream (reads) or ``trio.BrokenResourceError`` (writes), and
closes the handle with ``CloseHandle`` exactly once. It knows which end of the pipe
it holds, so it can ask Windows for the pid of the process at the other end.

What it does not do: create, connect or listen (``_windows_pipes``), decide who may
talk to it (``_windows_security``), or half-close: named pipes have no
``shutdown(SHUT_WR)``, so this is a plain ``trio.abc.Stream``. It is byte-mode
only; message-mode pipes (``ERROR_MORE_DATA``) are not supported.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from transports._windows_api import (
    ERROR_BROKEN_PIPE,
    ERROR_NO_DATA,
    ERROR_OPERATION_ABORTED,
    ERROR_PIPE_NOT_CONNECTED,
    OverlappedIo,
    Win32Api,
    Win32Error,
    winerror_of,
)

logger = logging.getLogger(__name__)

#: Bytes requested by ``receive_some()`` without an argument: one pipe buffer.
DEFAULT_RECEIVE_BYTES = 65536

#: Errors meaning the other end closed or disconnected the pipe: end-of-stream for
#: a reader, a broken stream for a writer.
PEER_GONE_ERRORS = frozenset({ERROR_BROKEN_PIPE, ERROR_NO_DATA, ERROR_PIPE_NOT_CONNECTED})


class PipeStream(trio.abc.Stream):
    """One end of a connected named pipe, as a ``trio.abc.Stream``.

    ``server_end`` says which end the handle is: the instance created with
    CreateNamedPipeW (True) or the end opened with CreateFileW (False). The handle
    is registered with the IOCP in the constructor unless ``register`` is False
    (the caller already did it); if registration raises, the caller keeps
    ownership of the handle. After ``aclose`` every method raises
    ``trio.ClosedResourceError``. One task may send while another receives; two
    concurrent senders (or receivers) raise ``trio.BusyResourceError``.
    """

    def __init__(
        self,
        api: Win32Api,
        io: OverlappedIo,
        handle: int,
        *,
        server_end: bool,
        register: bool = True,
    ) -> None:
        self._api = api
        self._io = io
        self._handle = handle
        self._server_end = server_end
        # Not ours until registration succeeded: if it raises, the caller still owns
        # the handle and __del__ must not close it behind the caller's back.
        self._closed = True
        self._handed_off = False
        self._sending = False
        self._receiving = False
        if register:
            io.register(handle)
        self._closed = False

    def __repr__(self) -> str:
        end = "server" if self._server_end else "client"
        state = "closed" if self._closed else f"handle={self._handle:#x}"
        return f"<PipeStream {end} end {state}>"

    @property
    def handle(self) -> int:
        """The pipe HANDLE (raises ``trio.ClosedResourceError`` once closed)."""
        if self._closed:
            raise trio.ClosedResourceError("this pipe stream is closed")
        return self._handle

    @property
    def server_end(self) -> bool:
        """True when this is the instance the server created."""
        return self._server_end

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def handed_off(self) -> bool:
        """True once the handle was given to another process (see ``mark_handed_off``)."""
        return self._handed_off

    def mark_handed_off(self) -> None:
        """Refuse further I/O: the handle now belongs to another process too.

        The receiver detaches the shared file object from this process's completion
        port when it adopts the handle, after which an overlapped operation here
        would never complete (and cancelling it would crash trio's run loop). Only
        ``aclose`` remains allowed. Reads and writes raise
        ``trio.BrokenResourceError``.
        """
        self._handed_off = True

    def _io_handle(self) -> int:
        handle = self.handle
        if self._handed_off:
            raise trio.BrokenResourceError(
                "this pipe connection was handed to another process; only closing it is allowed"
            )
        return handle

    def peer_pid(self) -> int:
        """The pid of the process at the other end, as the pipe driver recorded it.

        GetNamedPipeClientProcessId on a server end, GetNamedPipeServerProcessId on a
        client end. Raises ``Win32Error``.
        """
        if self._server_end:
            return self._api.get_named_pipe_client_process_id(self.handle)
        return self._api.get_named_pipe_server_process_id(self.handle)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``.

        Raises ``trio.BrokenResourceError`` when the other end is gone and
        ``trio.ClosedResourceError`` if this stream was closed. Cancellation cancels
        the pending WriteFile; some of the bytes may already have been written.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this pipe")
        self._sending = True
        try:
            handle = self._io_handle()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            try:
                written = await self._io.write(handle, data)
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("another task closed this pipe") from None
                raise trio.BrokenResourceError(
                    f"writing to the pipe failed (Windows error {winerror_of(exc)})"
                ) from exc
            if written != len(data):
                raise trio.BrokenResourceError(
                    f"short write on a byte-mode pipe: {written} of {len(data)} bytes"
                )
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Return at once: overlapped writes never report readiness in advance.

        Cancellation: a plain checkpoint.
        """
        if self._closed:
            raise trio.ClosedResourceError("this pipe stream is closed")
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Read up to ``max_bytes`` (default 64 KiB); ``b""`` once the other end is gone.

        ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED and ERROR_NO_DATA are
        end-of-stream; other errors raise ``trio.BrokenResourceError``. Cancellation
        cancels the pending ReadFile; no bytes are lost (a read that completed
        before the cancel took effect is returned).
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this pipe")
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            handle = self._io_handle()
            buffer = bytearray(max_bytes)
            try:
                count = await self._io.readinto(handle, buffer)
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("another task closed this pipe") from None
                code = winerror_of(exc)
                if code in PEER_GONE_ERRORS or isinstance(exc, BrokenPipeError):
                    await trio.lowlevel.checkpoint()
                    return b""
                if code == ERROR_OPERATION_ABORTED:
                    raise trio.ClosedResourceError("the read was aborted") from exc
                raise trio.BrokenResourceError(
                    f"reading from the pipe failed (Windows error {code})"
                ) from exc
            del buffer[count:]
            return buffer
        finally:
            self._receiving = False

    def close(self) -> None:
        """Close the handle now (idempotent). Pending I/O in other tasks is aborted."""
        if self._closed:
            return
        self._closed = True
        try:
            self._api.close_handle(self._handle)
        except Win32Error as exc:
            logger.debug("closing pipe handle %#x failed: %s", self._handle, exc)

    async def aclose(self) -> None:
        """Close the handle. Cancellation: the handle is closed even if cancelled."""
        self.close()
        await trio.lowlevel.checkpoint()

    def detach(self) -> int:
        """Give up ownership of the handle without closing it, and return it."""
        handle = self.handle
        self._closed = True
        return handle

    def __del__(self) -> None:
        # A stream dropped without aclose() must not leak its handle. Only
        # reached for streams nobody closed; errors cannot propagate from __del__.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()
