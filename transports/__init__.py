"""Local IPC for rpbroker, behind one interface.

What this package does: everything that touches the operating system's local IPC:
per-user runtime directories and endpoint names, listening and connecting, the
kernel's view of a peer, passing an open connection to another process, the
broker-to-backend control channel, and spawning children that die with the broker.
This ``__init__`` is the only place that chooses a platform; ``rpbroker`` imports
from here and never branches on the platform itself.

What it does not do: speak protobuf or know about services, tokens' meaning, or
policy. Messages on a control channel are opaque v1 frames.
"""

from __future__ import annotations

import sys

from transports._interface import (
    CONTROL_CHANNEL_ENV,
    FRAME_HEADER_BYTES,
    FRAMING_BYTE,
    HANDOFF_TOKEN_BYTES,
    ChannelClosedError,
    ChannelProtocolError,
    ChildControl,
    ChildProcess,
    ConnectionPassError,
    ControlChannel,
    EndpointInUseError,
    EndpointNameError,
    EndpointUnavailableError,
    FdExhaustedError,
    HostFactUnavailableError,
    InsecurePathError,
    Listener,
    PassedConnection,
    PassFailure,
    PassReceipt,
    PeerIdentity,
    PeerNotAllowedError,
    ProcessGoneError,
    ReceivedMessage,
    SpawnError,
    TransportError,
)

if sys.platform == "win32":
    from transports._windows import (
        PLATFORM_NAME,
        broker_endpoint,
        connect,
        current_user,
        mode_is_private,
        new_backend_endpoint,
        open_control_pair,
        open_fd_count,
        open_inherited_control_channel,
        open_listener,
        peer_identity,
        runtime_dir,
        spawn_child,
        user_hash,
        verify_private_dir,
        wait_peer_closed,
    )
    from transports._windows_host import boot_id, process_executable
else:
    from transports._unix import (
        PLATFORM_NAME,
        broker_endpoint,
        connect,
        current_user,
        mode_is_private,
        new_backend_endpoint,
        open_control_pair,
        open_fd_count,
        open_inherited_control_channel,
        open_listener,
        peer_identity,
        runtime_dir,
        spawn_child,
        user_hash,
        verify_private_dir,
        wait_peer_closed,
    )
    from transports._unix_host import boot_id, process_executable

__all__ = [
    "CONTROL_CHANNEL_ENV",
    "FRAME_HEADER_BYTES",
    "FRAMING_BYTE",
    "HANDOFF_TOKEN_BYTES",
    "PLATFORM_NAME",
    "ChannelClosedError",
    "ChannelProtocolError",
    "ChildControl",
    "ChildProcess",
    "ConnectionPassError",
    "ControlChannel",
    "EndpointInUseError",
    "EndpointNameError",
    "EndpointUnavailableError",
    "FdExhaustedError",
    "HostFactUnavailableError",
    "InsecurePathError",
    "Listener",
    "PassFailure",
    "PassReceipt",
    "PassedConnection",
    "PeerIdentity",
    "PeerNotAllowedError",
    "ProcessGoneError",
    "ReceivedMessage",
    "SpawnError",
    "TransportError",
    "boot_id",
    "broker_endpoint",
    "connect",
    "current_user",
    "mode_is_private",
    "new_backend_endpoint",
    "open_control_pair",
    "open_fd_count",
    "open_inherited_control_channel",
    "open_listener",
    "peer_identity",
    "process_executable",
    "runtime_dir",
    "spawn_child",
    "user_hash",
    "verify_private_dir",
    "wait_peer_closed",
]
