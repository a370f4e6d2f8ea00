"""Who is who on Windows: token SIDs, current-user-only security descriptors, peers.

What this module does: reads the user SID of the current process and of another
process (by pid) from its access token, builds the security descriptor rpbroker
puts on every pipe it creates (SDDL ``D:P(A;;GA;;;<current user SID>)``: a
protected DACL with one entry granting the current user full access, so no other
account may connect or create instances) and always releases it with
``LocalFree``, and reports the ``PeerIdentity`` at the other end of a
``PipeStream``.

What it does not do: decide whether a peer is allowed (the broker compares the
SID with ``current_user()``), or impersonate anyone: clients open pipes with
``SECURITY_IDENTIFICATION`` so the server could at most identify them. Integrity
levels, logon sessions and AppContainer SIDs are not considered.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from transports._interface import PeerIdentity, TransportError
from transports._windows_api import (
    PROCESS_QUERY_LIMITED_INFORMATION,
    TOKEN_QUERY,
    Win32Api,
    Win32Error,
)
from transports._windows_stream import PipeStream

#: Shape of a SID string (``S-1-5-21-...``); checked before a SID enters an SDDL
#: string so a malformed value can never change the descriptor's meaning.
_SID_PATTERN = re.compile(r"S-1-[0-9]+(-[0-9]+)+")


def check_sid(sid: str) -> str:
    """Return ``sid`` if it looks like a SID string, else raise ``TransportError``."""
    if not _SID_PATTERN.fullmatch(sid):
        raise TransportError(f"{sid[:80]!r} is not a SID string")
    return sid


def owner_only_sddl(sid: str) -> str:
    """The SDDL of a protected DACL granting ``sid`` (and nobody else) GENERIC_ALL."""
    return f"D:P(A;;GA;;;{check_sid(sid)})"


@contextmanager
def owner_only_descriptor(api: Win32Api, sid: str) -> Iterator[int]:
    """A self-relative security descriptor for ``owner_only_sddl(sid)``, freed on exit.

    Yields its address; CreateNamedPipeW copies it, so it only has to live for the
    duration of the call. Raises ``TransportError`` if Windows rejects the SDDL.
    """
    sddl = owner_only_sddl(sid)
    try:
        descriptor = api.security_descriptor_from_sddl(sddl)
    except Win32Error as exc:
        raise TransportError(f"cannot build the pipe security descriptor: {exc}") from exc
    try:
        yield descriptor
    finally:
        api.local_free(descriptor)


def token_user_sid(api: Win32Api, process: int) -> str:
    """The user SID of ``process``'s primary token (OpenProcessToken(TOKEN_QUERY)).

    The token handle is always closed; ``process`` is not. Raises ``Win32Error``.
    """
    token = api.open_process_token(process, TOKEN_QUERY)
    try:
        return check_sid(api.get_token_user_sid(token))
    finally:
        api.close_handle_quietly(token)


def current_process_sid(api: Win32Api) -> str:
    """The user SID of this process (via the GetCurrentProcess pseudo-handle)."""
    try:
        return token_user_sid(api, api.get_current_process())
    except Win32Error as exc:
        raise TransportError(f"cannot read the current user's SID: {exc}") from exc


def process_sid(api: Win32Api, pid: int) -> str:
    """The user SID of process ``pid``.

    OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION), then ``token_user_sid``; the
    process handle is always closed. Raises ``Win32Error``.
    """
    process = api.open_process(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    try:
        return token_user_sid(api, process)
    finally:
        api.close_handle_quietly(process)


def pipe_peer_identity(api: Win32Api, stream: PipeStream) -> PeerIdentity:
    """The pid and user SID of the process at the other end of ``stream``.

    The pid is what the pipe driver recorded when the other end connected (or
    created the instance), so it is the kernel's word, not the peer's claim; the
    SID is read from that process's token now. Raises ``TransportError`` when the
    peer has already exited or cannot be opened.
    """
    try:
        pid = stream.peer_pid()
    except Win32Error as exc:
        raise TransportError(f"cannot read the pipe peer's pid: {exc}") from exc
    try:
        sid = process_sid(api, pid)
    except Win32Error as exc:
        raise TransportError(f"cannot read the user of peer process {pid}: {exc}") from exc
    return PeerIdentity(pid=pid, user=sid)
