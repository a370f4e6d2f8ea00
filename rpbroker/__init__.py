"""rpbroker: a trio-native, local-IPC service broker speaking running-process broker v1.

Embed a broker with ``open_broker`` / ``serve_broker``, connect to a service with
``connect`` (trio) or ``BlockingClient`` / ``connect_blocking`` (any thread, plain
sockets), and write backends with ``rpbroker.backend.serve_backend``.
"""

from __future__ import annotations

from rpbroker._version import __version__
from rpbroker.blocking import BlockingClient, BrokeredSocket
from rpbroker.blocking import connect as connect_blocking
from rpbroker.broker import Broker, open_broker, serve_broker
from rpbroker.client import BrokeredStream, Route, connect, open_connection
from rpbroker.config import BrokerConfig
from rpbroker.errors import (
    BackendEnvironmentError,
    BackendUnavailableError,
    BrokerError,
    BrokerProtocolError,
    BrokerUnavailableError,
    ConfigError,
    ConnectArgumentError,
    ConnectTimeoutError,
    RefusedError,
)
from rpbroker.events import EventKind, LifecycleEvent
from rpbroker.policy.broadcast import BroadcastResult, Quiesce, QuiesceReason, ReleaseHandles
from rpbroker.wire.codes import RefusalCode

__all__ = [
    "BackendEnvironmentError",
    "BackendUnavailableError",
    "BlockingClient",
    "BroadcastResult",
    "Broker",
    "BrokerConfig",
    "BrokerError",
    "BrokerProtocolError",
    "BrokerUnavailableError",
    "BrokeredSocket",
    "BrokeredStream",
    "ConfigError",
    "ConnectArgumentError",
    "ConnectTimeoutError",
    "EventKind",
    "LifecycleEvent",
    "Quiesce",
    "QuiesceReason",
    "RefusalCode",
    "RefusedError",
    "ReleaseHandles",
    "Route",
    "__version__",
    "connect",
    "connect_blocking",
    "open_broker",
    "open_connection",
    "serve_broker",
]
