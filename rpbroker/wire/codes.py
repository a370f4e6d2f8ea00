"""Wire-level enumerations of the v1 broker protocol as Python enums.

What this module does: gives every numeric code that crosses the wire a typed
name (frame kinds, payload encodings, refusal codes, capability bits, admin verbs
and reply kinds, broker isolation, lifecycle event kinds) plus the enums of
rpbroker's private lifecycle lane (quiesce reason, broadcast ack status, service
commands and their outcome, operator streams and how they end). The v1
values are frozen by the v1 schema (facts §9, §11); the generated protobuf classes
carry the same numbers, and tests/wire checks that they agree.

What it does not do: encode or decode anything, or decide which code applies.
"""

from __future__ import annotations

import enum


class FrameKind(enum.IntEnum):
    """``Frame.kind``."""

    REQUEST = 0
    RESPONSE = 1
    EVENT = 2
    CANCEL = 3


class PayloadEncoding(enum.IntEnum):
    """``Frame.payload_encoding``. v1 accepts only ``NONE``."""

    NONE = 0
    ZSTD = 1
    SNAPPY = 2
    LZ4 = 3


class RefusalCode(enum.IntEnum):
    """``Refused.code`` (wire enum ``ErrorCode``)."""

    UNSPECIFIED = 0
    VERSION_UNSUPPORTED = 1
    SERVICE_UNKNOWN = 2
    BACKEND_SPAWN_FAILED = 3
    RATE_LIMITED = 4
    SHUTTING_DOWN = 5
    PEER_REJECTED = 6
    INTERNAL = 7
    VERSION_BLOCKED = 8
    FD_PRESSURE = 9


class RefusalDetail(enum.StrEnum):
    """The keys rpbroker writes into ``Refused.details`` (``map<string, string>``).

    The reference broker always sends the map empty and its clients ignore it, so
    these keys are rpbroker's own and filling them changes nothing for reference
    clients. Values are strings; a list (the allow-list) is joined with commas,
    which no valid version contains.
    """

    #: The service the Hello asked for (SERVICE_UNKNOWN).
    SERVICE_NAME = "service_name"
    #: The version the Hello asked for (VERSION_BLOCKED).
    WANTED_VERSION = "wanted_version"
    #: The service's version floor, when it has one (VERSION_BLOCKED).
    MIN_VERSION = "min_version"
    #: The service's exact allow-list, comma-joined, when it has one (VERSION_BLOCKED).
    VERSION_ALLOW_LIST = "version_allow_list"
    #: The Hello field that failed its shape check (PEER_REJECTED).
    FIELD = "field"
    #: That field's value, printable ASCII and truncated (PEER_REJECTED).
    VALUE = "value"
    #: The grammar the field must match (PEER_REJECTED).
    GRAMMAR = "grammar"


class Capability(enum.IntFlag):
    """Capability bits of ``Hello.client_capabilities`` / ``Negotiated.server_capabilities``.

    A bit is in effect only when both sides set it. Bits are never reused.
    """

    NONE = 0
    HANDLE_PASSING = 0x1


class AdminVerb(enum.IntEnum):
    """``AdminRequest.verb``. Values 10-20 are reserved."""

    UNSPECIFIED = 0
    STATUS = 1
    DUMP = 2
    LIST_INSTANCES = 3
    HEALTHZ = 4
    READYZ = 5
    BACKEND_HEALTH = 6
    CONFIG = 7
    DIAGNOSE = 8
    METRICS = 9
    SHUTDOWN = 21


class AdminReplyKind(enum.IntEnum):
    """``AdminReply.kind``."""

    TEXT = 0
    JSON = 1
    OPENMETRICS = 2


class BrokerIsolation(enum.IntEnum):
    """``ServiceDefinition.isolation``."""

    PRIVATE_BROKER = 0
    SHARED_BROKER = 1
    EXPLICIT_INSTANCE = 2


#: ``Hello``/``Negotiated``/``Refused`` protocol version (``Frame.envelope_version`` too).
PROTOCOL_VERSION = 1
#: The outer framing byte; a separate constant that happens to equal ``PROTOCOL_VERSION``.
FRAMING_VERSION = 1


class EventKind(enum.IntEnum):
    """``LifecycleEvent.kind``. Values 21-50 are reserved for later kinds."""

    UNSPECIFIED = 0
    SPAWN_ATTEMPT = 1
    SPAWN = 2
    DIED_IDLE = 3
    DIED_SHUTDOWN = 4
    DIED_CRASH = 5
    VERSION_MISMATCH = 6
    REPLACED_BY_NEWER = 7
    HELLO_ACCEPTED = 8
    HELLO_REFUSED = 9
    SERVICE_DEF_LOADED = 10
    SERVICE_DEF_CHANGED = 11
    BROADCAST_SENT = 12
    BROADCAST_ACK = 13
    BROADCAST_TIMEOUT = 14
    PROTOCOL_DOWNGRADE = 15
    CACHE_CORRUPTION_DETECTED = 16
    RESOURCE_PRESSURE = 17
    SECURITY_VIOLATION = 18
    TEARDOWN_HOOK_FAILED = 19
    MANIFEST_REWRITTEN = 20


class QuiesceReason(enum.IntEnum):
    """``Quiesce.reason`` on rpbroker's private lifecycle lane (0xF1C0)."""

    UNSPECIFIED = 0
    IDLE_TIMEOUT = 1
    BROKER_SHUTDOWN = 2
    MAINTENANCE = 3


class BroadcastAckStatus(enum.IntEnum):
    """``BroadcastAck.status`` on rpbroker's private lifecycle lane (0xF1C0)."""

    UNSPECIFIED = 0
    ACKED = 1
    UNSUPPORTED_OPERATION = 2
    REJECTED = 3
    BACKEND_ERROR = 4


class ServiceCommand(enum.IntEnum):
    """``ServiceCommandRequest.command`` (lifecycle lane): what to do to one service."""

    UNSPECIFIED = 0
    STOP = 1
    RESTART = 2
    QUIESCE = 3


class ServiceCommandOutcome(enum.IntEnum):
    """``ServiceCommandReport.outcome`` (lifecycle lane)."""

    UNSPECIFIED = 0
    DONE = 1
    UNKNOWN_SERVICE = 2
    INCOMPLETE = 3
    BAD_REQUEST = 4


class StreamSource(enum.IntEnum):
    """``StreamRequest.source`` (lifecycle lane): what an operator stream carries."""

    UNSPECIFIED = 0
    EVENTS = 1
    BACKEND_OUTPUT = 2


class StreamEndReason(enum.IntEnum):
    """``StreamEnd.reason`` (lifecycle lane): why an operator stream ended."""

    UNSPECIFIED = 0
    HISTORY_SENT = 1
    BROKER_STOPPING = 2
    UNKNOWN_SERVICE = 3
    BAD_REQUEST = 4
    TOO_SLOW = 5
