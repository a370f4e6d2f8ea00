"""Passing an open pipe connection to another process with DuplicateHandle (facts §3.7).

What this module does: ``duplicate_into_process`` opens the receiving process with
``PROCESS_DUP_HANDLE``, duplicates the connection's handle into it with
``DUPLICATE_SAME_ACCESS`` (never ``DUPLICATE_CLOSE_SOURCE``: the sender keeps and
later closes its own handle), always closes the process handle, and maps failures
to ``PassFailure`` exactly as the reference does. The result is a ``PassReceipt``
whose ``handle_value`` is the value *in the receiver's handle table*; it travels
in ``HandoffOffer.handle_value``. ``adopt_pipe_handle`` is the receiver's side: it
detaches the duplicated file object from the sender's completion port and wraps
it in a ``PipeStream``.

What it does not do: send anything (there is no SCM_RIGHTS step on Windows; the
token travels only in the offer the caller sends), or close the duplicate after a
later failure: once DuplicateHandle succeeded the handle lives in the receiver's
table and the sender cannot close it. It leaks until the receiver exits; callers
report it as ``ConnectionPassError.leaked_handle`` / ``PassReceipt.duplicated_handle``.
"""

from __future__ import annotations

import logging

from transports._interface import (
    HANDOFF_TOKEN_BYTES,
    ConnectionPassError,
    PassedConnection,
    PassFailure,
    PassReceipt,
)
from transports._windows_api import (
    DUPLICATE_SAME_ACCESS,
    ERROR_ACCESS_DENIED,
    INVALID_HANDLE_VALUE,
    PROCESS_DUP_HANDLE,
    OverlappedIo,
    Win32Api,
    Win32Error,
    is_valid_handle,
)
from transports._windows_stream import PipeStream

logger = logging.getLogger(__name__)

#: Largest handle value accepted from an offer: handle values are 32-bit
#: significant even in 64-bit processes (they must survive a 32-bit peer).
MAX_HANDLE_VALUE = 0xFFFFFFFF


def check_token(token: bytes) -> None:
    """Raise ``ConnectionPassError(FAILED)`` unless ``token`` is 16 bytes."""
    if len(token) != HANDOFF_TOKEN_BYTES:
        raise ConnectionPassError(
            PassFailure.FAILED,
            f"a handoff token is {HANDOFF_TOKEN_BYTES} bytes, got {len(token)}",
        )


def duplicate_into_process(api: Win32Api, source_handle: int, target_pid: int) -> PassReceipt:
    """Duplicate ``source_handle`` (ours) into process ``target_pid``.

    Sequence: OpenProcess(PROCESS_DUP_HANDLE, FALSE, pid); DuplicateHandle(
    GetCurrentProcess(), source, target, &dup, 0, FALSE, DUPLICATE_SAME_ACCESS);
    CloseHandle(target) in every case. Failure mapping:

    - OpenProcess: ERROR_ACCESS_DENIED is PERMISSION_DENIED, anything else
      BACKEND_UNAVAILABLE (the process is gone or the pid is unknown: 0 is refused
      before any call);
    - DuplicateHandle: ERROR_ACCESS_DENIED is PERMISSION_DENIED, anything else
      FAILED; a "successful" NULL or INVALID_HANDLE_VALUE result is FAILED.

    Raises ``ConnectionPassError`` (with ``os_error`` and no leaked handle: nothing
    reached the receiver when duplication failed).
    """
    if target_pid <= 0:
        raise ConnectionPassError(
            PassFailure.BACKEND_UNAVAILABLE, "the receiving process id is unknown"
        )
    try:
        target_process = api.open_process(PROCESS_DUP_HANDLE, False, target_pid)
    except Win32Error as exc:
        kind = (
            PassFailure.PERMISSION_DENIED
            if exc.code == ERROR_ACCESS_DENIED
            else PassFailure.BACKEND_UNAVAILABLE
        )
        raise ConnectionPassError(
            kind, f"OpenProcess({target_pid}) failed: {exc}", os_error=exc.code
        ) from exc
    try:
        duplicated = api.duplicate_handle(
            api.get_current_process(),
            source_handle,
            target_process,
            0,
            False,
            DUPLICATE_SAME_ACCESS,
        )
    except Win32Error as exc:
        kind = (
            PassFailure.PERMISSION_DENIED if exc.code == ERROR_ACCESS_DENIED else PassFailure.FAILED
        )
        raise ConnectionPassError(
            kind,
            f"DuplicateHandle into process {target_pid} failed: {exc}",
            os_error=exc.code,
        ) from exc
    finally:
        if not api.close_handle_quietly(target_process):
            logger.warning("closing the handle of process %d failed", target_pid)
    if not is_valid_handle(duplicated):
        raise ConnectionPassError(
            PassFailure.FAILED,
            f"DuplicateHandle into process {target_pid} returned an invalid handle "
            f"({duplicated:#x})",
        )
    return PassReceipt(handle_value=duplicated, duplicated_handle=duplicated)


def adopt_pipe_handle(
    api: Win32Api, io: OverlappedIo, handle_value: int, token: bytes
) -> PassedConnection | None:
    """Wrap a handle duplicated into this process as a ``PassedConnection``.

    The handle is the sender's accepted (server) end. Its file object is still
    attached to the sender's completion port, so it is detached first
    (NtSetInformationFile FileReplaceCompletionInformation, Windows 8.1+), then
    registered with ours. Returns ``None`` (and logs why) for a value that cannot
    be a handle or cannot be adopted; a handle that was plausibly ours is closed
    in that case so it does not leak here too.
    """
    if handle_value <= 0 or handle_value > MAX_HANDLE_VALUE or handle_value == INVALID_HANDLE_VALUE:
        logger.warning("handoff offer carried no usable handle value (%d)", handle_value)
        return None
    try:
        api.remove_completion_port(handle_value)
    except Win32Error as exc:
        logger.warning("cannot detach handed-off handle %#x: %s", handle_value, exc)
        api.close_handle_quietly(handle_value)
        return None
    try:
        stream = PipeStream(api, io, handle_value, server_end=True)
    except OSError as exc:
        logger.warning("cannot register handed-off handle %#x: %s", handle_value, exc)
        api.close_handle_quietly(handle_value)
        return None
    return PassedConnection(token=bytes(token), stream=stream)
