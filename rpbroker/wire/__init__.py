"""rpbroker's wire layer: the running-process broker v1 protocol, byte for byte.

What this package does: defines the v1 messages (generated from
``proto/broker_v1.proto``) and rpbroker's private lifecycle lane
(``proto/rpbroker_lifecycle.proto``, payload protocol 0xF1C0); frames bodies
(``0x01`` + u32 LE length, 16 MiB / 64 KiB caps); decodes, encodes, builds and
checks ``Frame`` envelopes; keeps the payload-protocol registry; and formats the
endpoint identity probe. Everything a caller needs is re-exported here.

What it does not do: sockets, deadlines, peer credentials, or any decision about
how to answer a peer. Those live in the broker, handoff and backend modules.
"""

from __future__ import annotations

from rpbroker.wire._pb.broker_v1_pb2 import (
    AdminReply,
    AdminRequest,
    DaemonProcess,
    Endpoint,
    Frame,
    HandoffAck,
    HandoffOffer,
    Hello,
    HelloReply,
    LifecycleEvent,
    Negotiated,
    Refused,
    ServiceDefinition,
)
from rpbroker.wire._pb.rpbroker_lifecycle_pb2 import (
    BackendActivity,
    BackendReady,
    BroadcastAck,
    BroadcastCommand,
    BroadcastReport,
    BroadcastRequest,
    LifecycleMessage,
    Quiesce,
    ReleaseHandles,
)
from rpbroker.wire.codes import (
    FRAMING_VERSION,
    PROTOCOL_VERSION,
    AdminReplyKind,
    AdminVerb,
    BroadcastAckStatus,
    BrokerIsolation,
    Capability,
    EventKind,
    FrameKind,
    PayloadEncoding,
    QuiesceReason,
    RefusalCode,
)
from rpbroker.wire.frames import (
    EnvelopeFault,
    MalformedMessage,
    check_envelope,
    decode,
    decode_frame,
    encode,
    encode_handoff_offer_with_attachment,
    encode_varint,
    event,
    framed,
    handoff_offer_frame,
    request,
    response_to,
)
from rpbroker.wire.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_HELLO_BYTES,
    BadFramingByte,
    FrameDecoder,
    FrameStage,
    FrameTooLarge,
    FramingError,
    TruncatedFrame,
    encode_framed,
    parse_header,
    read_exactly,
    read_frame_body,
    write_frame_body,
)
from rpbroker.wire.probe import (
    PROBE_NONCE_BYTES,
    PROBE_REQUEST_PREFIX,
    ProbeNonceMismatch,
    parse_probe_reply,
    parse_probe_request,
    probe_reply_frame,
    probe_request_frame,
)
from rpbroker.wire.protocols import (
    FIRST_PARTY_PAYLOAD_PROTOCOLS,
    KNOWN_ENTRIES,
    KNOWN_PROTOCOLS,
    PROTOCOL_RANGES,
    KnownProtocol,
    PayloadProtocol,
    ProtocolOrigin,
    ProtocolRange,
    ProtocolRegistryError,
    check_registry,
    protocol_name,
    range_of,
)

__all__ = [
    # messages (running_process.broker.v1)
    "AdminReply",
    "AdminRequest",
    "DaemonProcess",
    "Endpoint",
    "Frame",
    "HandoffAck",
    "HandoffOffer",
    "Hello",
    "HelloReply",
    "LifecycleEvent",
    "Negotiated",
    "Refused",
    "ServiceDefinition",
    # messages (rpbroker.lifecycle.v1)
    "BackendActivity",
    "BackendReady",
    "BroadcastAck",
    "BroadcastCommand",
    "BroadcastReport",
    "BroadcastRequest",
    "LifecycleMessage",
    "Quiesce",
    "ReleaseHandles",
    # codes
    "FRAMING_VERSION",
    "PROTOCOL_VERSION",
    "AdminReplyKind",
    "AdminVerb",
    "BroadcastAckStatus",
    "BrokerIsolation",
    "Capability",
    "EventKind",
    "FrameKind",
    "PayloadEncoding",
    "QuiesceReason",
    "RefusalCode",
    # framing
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_HELLO_BYTES",
    "BadFramingByte",
    "FrameDecoder",
    "FrameStage",
    "FrameTooLarge",
    "FramingError",
    "TruncatedFrame",
    "encode_framed",
    "parse_header",
    "read_exactly",
    "read_frame_body",
    "write_frame_body",
    # frames
    "EnvelopeFault",
    "MalformedMessage",
    "check_envelope",
    "decode",
    "decode_frame",
    "encode",
    "encode_handoff_offer_with_attachment",
    "encode_varint",
    "event",
    "framed",
    "handoff_offer_frame",
    "request",
    "response_to",
    # probe
    "PROBE_NONCE_BYTES",
    "PROBE_REQUEST_PREFIX",
    "ProbeNonceMismatch",
    "parse_probe_reply",
    "parse_probe_request",
    "probe_reply_frame",
    "probe_request_frame",
    # payload protocols
    "FIRST_PARTY_PAYLOAD_PROTOCOLS",
    "KNOWN_ENTRIES",
    "KNOWN_PROTOCOLS",
    "PROTOCOL_RANGES",
    "KnownProtocol",
    "PayloadProtocol",
    "ProtocolOrigin",
    "ProtocolRange",
    "ProtocolRegistryError",
    "check_registry",
    "protocol_name",
    "range_of",
]
