"""The Unix transport: ``AF_UNIX`` sockets, ``SCM_RIGHTS``, ``SO_PEERCRED``, process groups.

What this module does: gathers the Unix implementation of the transport contract
(``transports._interface``) under the names ``transports/__init__.py`` imports.
Each concept lives in its own module:

- ``_unix_paths``: current user, runtime directory, private-directory check,
  endpoint names and the ``sun_path`` limit;
- ``_unix_listen`` / ``_unix_connect``: binding (with squatting refusal and stale
  socket cleanup, also of a whole runtime directory) and connecting;
- ``_unix_files``: reading a small private file without ever blocking;
- ``_unix_peer``: peer credentials;
- ``_unix_fdpass``: sending a descriptor with its token;
- ``_unix_control``: the framed broker-to-backend socketpair;
- ``_unix_spawn``: children in their own process group with a parent-death signal;
- ``_unix_fds``: descriptor counting, listing and closing helpers;
- ``_unix_nowait``: reading, writing and closing a connection without waiting;
- ``_unix_children``: this process's unreaped children, from ``/proc``;
- ``_unix_systemd``: the socket systemd passes and the ``sd_notify`` messages.
- ``_unix_reaper`` / ``_unix_reaper_program``: the helper process that kills those
  groups when the broker dies;
- ``_unix_fds``: descriptor counting and closing helpers.

What it does not do: anything on Windows (``transports._windows``), or speak
protobuf, or apply policy.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Unix only. Asserting it before the other imports also makes mypy --platform win32
# skip this module (the imports below are therefore not at the top: E402).
assert sys.platform != "win32", "transports._unix is the Unix transport"


from transports._unix_children import child_processes
from transports._unix_connect import connect, connect_blocking
from transports._unix_control import (
    UnixChildControl,
    UnixControlChannel,
    open_control_pair,
    open_inherited_control_channel,
)
from transports._unix_fds import fd_usage_ratio, open_fd_count, open_fds, wait_peer_closed
from transports._unix_files import read_private_file
from transports._unix_listen import (
    UnixListener,
    clear_stale_endpoint,
    open_listener,
    remove_stale_backend_endpoints,
)
from transports._unix_nowait import close_now, receive_now, send_now
from transports._unix_paths import (
    SUN_PATH_MAX_BYTES,
    broker_endpoint,
    check_backend_endpoint_room,
    check_sun_path,
    current_user,
    ensure_private_dir,
    mode_is_private,
    new_backend_endpoint,
    runtime_dir,
    short_temp_dir,
    user_hash,
    verify_private_dir,
)
from transports._unix_peer import peer_identity
from transports._unix_spawn import UnixChildProcess, spawn_child
from transports._unix_systemd import UnixServiceNotifier, inherited_listener, service_notifier

#: Name of this transport, for logs and diagnostics.
PLATFORM_NAME = "unix"

__all__ = [
    "PLATFORM_NAME",
    "SUN_PATH_MAX_BYTES",
    "UnixChildControl",
    "UnixChildProcess",
    "UnixControlChannel",
    "UnixListener",
    "UnixServiceNotifier",
    "broker_endpoint",
    "child_processes",
    "check_backend_endpoint_room",
    "check_endpoint_name",
    "clear_stale_endpoint",
    "close_now",
    "connect",
    "connect_blocking",
    "current_user",
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
    "short_temp_dir",
    "spawn_child",
    "user_hash",
    "mode_is_private",
    "verify_private_dir",
    "wait_peer_closed",
]

#: Raise ``EndpointNameError`` unless a socket path fits the platform's limit.
check_endpoint_name = check_sun_path
