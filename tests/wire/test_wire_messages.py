"""Schema conformance of the generated messages.

Golden bytes here were written by hand from the proto3 encoding rules (tag =
field << 3 | wire type; varints little-endian base 128; defaults omitted; fields
ascending), then checked against the encoder; a few are the "derived" vectors of
the reference facts. Also: unknown fields are skipped, every message round-trips,
field numbers/types and reserved ranges match the v1 tables, and the Python enums
in ``codes`` agree with the proto enums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from rpbroker import wire
from rpbroker.wire import _pb, codes
from rpbroker.wire._pb import broker_v1_pb2 as v1
from rpbroker.wire._pb import rpbroker_lifecycle_pb2 as lc

H = bytes.fromhex

GOLDEN_HELLO = wire.Hello(
    client_min_protocol=1,
    client_max_protocol=1,
    service_name="zccache",
    wanted_version="1.2.3",
    client_version="rp/4.5",
    client_capabilities=1,
    request_id="r1",
    peer_pid=4242,
    client_keepalive_secs=30,
)
GOLDEN_HELLO_HEX = (
    "0801 1001"
    " 1a07 7a636361636865"  # 3: "zccache"
    " 2205 312e322e33"  # 4: "1.2.3"
    " 2a06 72702f342e35"  # 5: "rp/4.5"
    " 3001"  # 6: capabilities 1
    " 4202 7231"  # 8: request_id "r1" (a string)
    " 509221"  # 10: peer_pid 4242 = 0x1092
    " 781e"  # 15: keepalive 30
)

TOKEN = bytes(range(16))

# (sample, hand-derived canonical bytes)
GOLDEN: list[tuple[Message, str]] = [
    (
        wire.Frame(
            envelope_version=1,
            kind=v1.FRAME_KIND_RESPONSE,
            payload_protocol=0xAD01,
            payload=b"hi",
            request_id=300,
            deadline_unix_ms=1,
            traceparent="tp",
            tracestate="ts",
        ),
        "0801 1001 1881da02 22026869 28ac02 3801 42027470 4a027473",
    ),
    (GOLDEN_HELLO, GOLDEN_HELLO_HEX),
    (
        wire.Negotiated(
            negotiated_protocol=1,
            daemon_version="1.0.0",
            backend_pipe="/p",
            warnings=["w"],
            server_capabilities=1,
            keepalive_interval_secs=1800,
            handle_passed_token=b"\xaa\xbb",
            connection_id=1,
        ),
        "0801 1205312e302e30 1a022f70 220177 2801 30880e 3a02aabb 4001",
    ),
    (
        wire.Refused(
            reason="busy",
            daemon_min_protocol=1,
            daemon_max_protocol=1,
            code=v1.ERROR_RATE_LIMITED,
            details={"k": "v"},
            retry_after_ms=250,
        ),
        "0a0462757379 1001 1801 2004 2a06 0a016b 120176 30fa01",
    ),
    (
        wire.HelloReply(refused=wire.Refused(reason="x", code=v1.ERROR_PEER_REJECTED)),
        "1205 0a0178 2006",
    ),
    (wire.HelloReply(negotiated=wire.Negotiated()), "0a00"),
    (
        wire.HandoffOffer(token=TOKEN, service_name="build-cache", correlation_id=1),
        "1210000102030405060708090a0b0c0d0e0f 1a0b6275696c642d6361636865 2001",
    ),
    (
        wire.HandoffOffer(handle_value=300, token=b"t", correlation_id=2),
        "08ac02 120174 2002",
    ),
    (
        wire.HandoffAck(token=TOKEN, accepted=True, correlation_id=1),
        "0a10000102030405060708090a0b0c0d0e0f 1001 2001",
    ),
    (
        wire.HandoffAck(token=b"t", error_detail="no", correlation_id=3),
        "0a0174 1a026e6f 2003",
    ),
    (wire.AdminRequest(verb=v1.ADMIN_VERB_STATUS, json=True), "0801 1001"),
    (
        wire.AdminRequest(
            verb=v1.ADMIN_VERB_SHUTDOWN,
            service_name="s",
            output_path="o",
            drain_deadline_ms=5000,
        ),
        "0815 1a0173 22016f 288827",
    ),
    (
        wire.AdminReply(
            kind=v1.ADMIN_REPLY_KIND_JSON,
            body="{}",
            exit_code=2,
            content_type="application/json",
        ),
        "0801 12027b7d 1802 2210" + b"application/json".hex(),
    ),
    (
        wire.ServiceDefinition(
            service_name="zccache",
            binary_path="/b",
            isolation=v1.BROKER_ISOLATION_EXPLICIT_INSTANCE,
            explicit_instance="ci",
            per_version_binary_dir="/d",
            min_version="1.0.0",
            version_allow_list=["1.0.0"],
            labels={"a": "b"},
        ),
        "0a077a636361636865 12022f62 1802 22026369 2a022f64 3205312e302e30"
        " 3a05312e302e30 4206 0a0161 120162",
    ),
    (wire.Endpoint(namespace_id="shared", path="/s"), "0a06736861726564 12022f73"),
    (
        wire.DaemonProcess(
            pid=7,
            exe_path="/x",
            ipc_endpoint=wire.Endpoint(namespace_id="shared", path="/s"),
            started_at_unix_ms=5,
            boot_id="b",
            idle_timeout_secs=0,  # proto3 `optional`: presence is encoded even for 0
            exe_hash_algorithm="blake3",
            exe_hash=b"\x01",
        ),
        "0807 12022f78 220c 0a06736861726564 12022f73 2805 320162 3800 4206626c616b6533 4a0101",
    ),
    (
        wire.LifecycleEvent(
            ts_ms=1,
            pid=2,
            service_name="s",
            kind=v1.EVENT_KIND_HELLO_REFUSED,
            reason="r",
            extra={"k": "v"},
            severity_number=9,
            severity_text="INFO",
            request_id="q",
            connection_id=3,
            broker_instance="i",
        ),
        "0801 1002 1a0173 2009 2a0172 3206 0a016b 120176 3809 4204494e464f 4a0171 5003 5a0169",
    ),
    (
        wire.LifecycleMessage(
            ready=wire.BackendReady(
                backend_pipe="/p", pid=10, service_name="s", service_version="1.0.0"
            )
        ),
        "0a10 0a022f70 100a 1a0173 2205312e302e30",
    ),
    (
        wire.LifecycleMessage(
            activity=wire.BackendActivity(open_connections=2, completed_connections=300)
        ),
        "1205 0802 10ac02",
    ),
    (
        wire.LifecycleMessage(
            broadcast=wire.BroadcastCommand(
                operation_id=1,
                quiesce=wire.Quiesce(reason=lc.QUIESCE_REASON_BROKER_SHUTDOWN),
                drain_deadline_ms=5000,
            )
        ),
        "1a09 0801 1a020802 208827",
    ),
    (wire.BroadcastCommand(operation_id=2, quiesce=wire.Quiesce()), "0802 1a00"),
    (
        wire.BroadcastCommand(
            operation_id=3, release_handles=wire.ReleaseHandles(path_prefix="/c")
        ),
        "0803 1204 0a022f63",
    ),
    (
        wire.LifecycleMessage(
            broadcast_ack=wire.BroadcastAck(
                operation_id=1, status=lc.BROADCAST_ACK_STATUS_ACKED, detail="d"
            )
        ),
        "2207 0801 1001 1a0164",
    ),
    (
        wire.LifecycleMessage(
            broadcast_request=wire.BroadcastRequest(
                release_handles=wire.ReleaseHandles(path_prefix="/c"), ack_timeout_ms=100
            )
        ),
        "2a08 0a04 0a022f63 1864",
    ),
    (
        wire.BroadcastRequest(
            quiesce=wire.Quiesce(reason=lc.QUIESCE_REASON_MAINTENANCE), ack_timeout_ms=1
        ),
        "1202 0803 1801",
    ),
    (
        wire.LifecycleMessage(broadcast_report=wire.BroadcastReport(json="{}")),
        "3204 0a027b7d",
    ),
    (wire.BackendReady(pid=1), "1001"),
    (wire.ReleaseHandles(path_prefix="/c"), "0a022f63"),
    (wire.Quiesce(reason=lc.QUIESCE_REASON_IDLE_TIMEOUT), "0801"),
    (
        wire.BroadcastAck(operation_id=9, status=lc.BROADCAST_ACK_STATUS_BACKEND_ERROR, detail="e"),
        "0809 1004 1a0165",
    ),
    (wire.BackendActivity(open_connections=1), "0801"),
    (wire.BroadcastReport(json="[]"), "0a025b5d"),
    (
        wire.ServiceCommandRequest(
            service_name="echo", command=lc.SERVICE_COMMAND_STOP, timeout_ms=5
        ),
        "0a04 6563686f 1001 1805",
    ),
    (
        wire.ServiceCommandReport(outcome=lc.SERVICE_COMMAND_OUTCOME_DONE, json="{}"),
        "0801 1202 7b7d",
    ),
    (
        wire.StreamRequest(
            source=lc.STREAM_SOURCE_BACKEND_OUTPUT, service_name="echo", follow=True
        ),
        "0802 1204 6563686f 1801",
    ),
    (
        wire.StreamRecord(
            output_line=wire.BackendOutputLine(pid=7, stream="stderr", truncated=True),
            dropped_before=2,
        ),
        "120c 1807 2206 737464657272 3801 1802",
    ),
    (wire.BackendOutputLine(text="a"), "2a0161"),
    (
        wire.StreamEnd(reason=lc.STREAM_END_REASON_HISTORY_SENT, dropped=3, detail="x"),
        "0801 1003 1a0178",
    ),
]


def _golden_id(case: tuple[Message, str]) -> str:
    return type(case[0]).__name__


@pytest.mark.parametrize("sample,hex_bytes", GOLDEN, ids=[_golden_id(c) for c in GOLDEN])
def test_golden_encoding(sample: Message, hex_bytes: str) -> None:
    assert wire.encode(sample) == H(hex_bytes)


@pytest.mark.parametrize("sample,hex_bytes", GOLDEN, ids=[_golden_id(c) for c in GOLDEN])
def test_golden_decodes_to_sample(sample: Message, hex_bytes: str) -> None:
    assert wire.decode(type(sample), H(hex_bytes)) == sample


def test_every_exported_message_type_has_a_golden_round_trip() -> None:
    covered = {type(sample).__name__ for sample, _ in GOLDEN}
    exported = {
        name
        for name in wire.__all__
        if isinstance(getattr(wire, name), type) and issubclass(getattr(wire, name), Message)
    }
    assert exported == covered
    assert len(exported) == 28


def test_hello_with_trailing_unknown_field_21_decodes_equal() -> None:
    data = H(GOLDEN_HELLO_HEX) + H("a80101")  # field 21 (reserved range is 16-20), varint 1
    decoded = wire.decode(wire.Hello, data)
    assert decoded == GOLDEN_HELLO
    # Like the v1 (prost) decoder, the unknown field is dropped, not re-emitted.
    assert wire.encode(decoded) == H(GOLDEN_HELLO_HEX)


def test_unknown_length_delimited_and_reserved_fields_are_skipped() -> None:
    frame = wire.request(0xAD01, b"x", request_id=1)
    # field 10 (reserved in Frame) as bytes, field 99 as a varint: both unknown here
    extra = H("5203616263") + H("98060f")
    assert wire.decode_frame(wire.encode(frame) + extra) == frame


def test_unknown_enum_value_is_kept_as_a_number() -> None:
    decoded = wire.decode(wire.AdminRequest, H("08e707"))  # verb 999
    assert decoded.verb == 999
    assert wire.encode(decoded) == H("08e707")


def test_refused_arm_and_negotiated_arm_are_exclusive() -> None:
    reply = wire.HelloReply(negotiated=wire.Negotiated(connection_id=1))
    assert reply.WhichOneof("result") == "negotiated"
    reply.refused.code = v1.ERROR_INTERNAL
    assert reply.WhichOneof("result") == "refused"
    assert not reply.HasField("negotiated")


def test_lifecycle_event_worst_case_fits_pipe_buf_floor() -> None:
    """Every kind 0-50 with maximal fields encodes in <= 512 bytes (POSIX PIPE_BUF floor)."""
    for kind in range(51):
        event = wire.LifecycleEvent(
            ts_ms=2**64 - 1,
            pid=2**32 - 1,
            service_name="a" * 64,
            kind=v1.EventKind.ValueType(kind),
            reason="x" * 80,
            extra={"key-one": "value-one", "key-two": "value-two"},
            severity_number=24,
            severity_text="CRITICAL",
            request_id="r" * 32,
            connection_id=2**64 - 1,
            broker_instance="i" * 20,
        )
        assert len(wire.encode(event)) <= 512


# --- schema tables (facts §9, §10, §11) --------------------------------------------

_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
}


def _file_proto(module: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def _message(
    proto: descriptor_pb2.FileDescriptorProto, name: str
) -> descriptor_pb2.DescriptorProto:
    return next(m for m in proto.message_type if m.name == name)


def _enum(
    proto: descriptor_pb2.FileDescriptorProto, name: str
) -> descriptor_pb2.EnumDescriptorProto:
    return next(e for e in proto.enum_type if e.name == name)


def _field_shape(message: descriptor_pb2.DescriptorProto) -> dict[int, tuple[str, str]]:
    maps = {nested.name for nested in message.nested_type if nested.options.map_entry}
    shape: dict[int, tuple[str, str]] = {}
    for field in message.field:
        type_name = field.type_name.rsplit(".", 1)[-1]
        if type_name in maps:
            kind = "map"
        elif field.type_name:
            kind = type_name
        else:
            kind = _SCALARS[field.type]
        if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED and kind != "map":
            kind = "repeated " + kind
        shape[field.number] = (field.name, kind)
    return shape


V1_FIELDS: dict[str, dict[int, tuple[str, str]]] = {
    "Frame": {
        1: ("envelope_version", "uint32"),
        2: ("kind", "FrameKind"),
        3: ("payload_protocol", "uint32"),
        4: ("payload", "bytes"),
        5: ("request_id", "uint64"),
        6: ("payload_encoding", "PayloadEncoding"),
        7: ("deadline_unix_ms", "uint64"),
        8: ("traceparent", "string"),
        9: ("tracestate", "string"),
    },
    "Hello": {
        1: ("client_min_protocol", "uint32"),
        2: ("client_max_protocol", "uint32"),
        3: ("service_name", "string"),
        4: ("wanted_version", "string"),
        5: ("client_version", "string"),
        6: ("client_capabilities", "uint64"),
        7: ("auth_token", "bytes"),
        8: ("request_id", "string"),
        9: ("connection_id", "uint64"),
        10: ("peer_pid", "uint32"),
        11: ("client_lib_name", "string"),
        12: ("client_lib_version", "string"),
        13: ("peer_attestation_nonce", "bytes"),
        14: ("capability_token", "bytes"),
        15: ("client_keepalive_secs", "uint64"),
    },
    "HelloReply": {1: ("negotiated", "Negotiated"), 2: ("refused", "Refused")},
    "Negotiated": {
        1: ("negotiated_protocol", "uint32"),
        2: ("daemon_version", "string"),
        3: ("backend_pipe", "string"),
        4: ("warnings", "repeated string"),
        5: ("server_capabilities", "uint64"),
        6: ("keepalive_interval_secs", "uint64"),
        7: ("handle_passed_token", "bytes"),
        8: ("connection_id", "uint64"),
    },
    "Refused": {
        1: ("reason", "string"),
        2: ("daemon_min_protocol", "uint32"),
        3: ("daemon_max_protocol", "uint32"),
        4: ("code", "ErrorCode"),
        5: ("details", "map"),
        6: ("retry_after_ms", "uint64"),
    },
    "HandoffOffer": {
        1: ("handle_value", "uint64"),
        2: ("token", "bytes"),
        3: ("service_name", "string"),
        4: ("correlation_id", "uint64"),
    },
    "HandoffAck": {
        1: ("token", "bytes"),
        2: ("accepted", "bool"),
        3: ("error_detail", "string"),
        4: ("correlation_id", "uint64"),
    },
    "AdminRequest": {
        1: ("verb", "AdminVerb"),
        2: ("json", "bool"),
        3: ("service_name", "string"),
        4: ("output_path", "string"),
        5: ("drain_deadline_ms", "uint64"),
    },
    "AdminReply": {
        1: ("kind", "AdminReplyKind"),
        2: ("body", "string"),
        3: ("exit_code", "uint32"),
        4: ("content_type", "string"),
    },
    "ServiceDefinition": {
        1: ("service_name", "string"),
        2: ("binary_path", "string"),
        3: ("isolation", "BrokerIsolation"),
        4: ("explicit_instance", "string"),
        5: ("per_version_binary_dir", "string"),
        6: ("min_version", "string"),
        7: ("version_allow_list", "repeated string"),
        8: ("labels", "map"),
    },
    "Endpoint": {1: ("namespace_id", "string"), 2: ("path", "string")},
    "DaemonProcess": {
        1: ("pid", "uint32"),
        2: ("exe_path", "string"),
        4: ("ipc_endpoint", "Endpoint"),
        5: ("started_at_unix_ms", "uint64"),
        6: ("boot_id", "string"),
        7: ("idle_timeout_secs", "uint32"),
        8: ("exe_hash_algorithm", "string"),
        9: ("exe_hash", "bytes"),
    },
    "LifecycleEvent": {
        1: ("ts_ms", "uint64"),
        2: ("pid", "uint32"),
        3: ("service_name", "string"),
        4: ("kind", "EventKind"),
        5: ("reason", "string"),
        6: ("extra", "map"),
        7: ("severity_number", "uint32"),
        8: ("severity_text", "string"),
        9: ("request_id", "string"),
        10: ("connection_id", "uint64"),
        11: ("broker_instance", "string"),
    },
}


@pytest.mark.parametrize("name", sorted(V1_FIELDS))
def test_v1_field_numbers_and_types(name: str) -> None:
    assert _field_shape(_message(_file_proto(v1), name)) == V1_FIELDS[name]


LIFECYCLE_FIELDS: dict[str, dict[int, tuple[str, str]]] = {
    "LifecycleMessage": {
        1: ("ready", "BackendReady"),
        2: ("activity", "BackendActivity"),
        3: ("broadcast", "BroadcastCommand"),
        4: ("broadcast_ack", "BroadcastAck"),
        5: ("broadcast_request", "BroadcastRequest"),
        6: ("broadcast_report", "BroadcastReport"),
        7: ("service_command", "ServiceCommandRequest"),
        8: ("service_command_report", "ServiceCommandReport"),
        9: ("stream_request", "StreamRequest"),
        10: ("stream_record", "StreamRecord"),
        11: ("stream_end", "StreamEnd"),
    },
    "BackendReady": {
        1: ("backend_pipe", "string"),
        2: ("pid", "uint32"),
        3: ("service_name", "string"),
        4: ("service_version", "string"),
    },
    "BackendActivity": {1: ("open_connections", "uint32"), 2: ("completed_connections", "uint64")},
    "BroadcastCommand": {
        1: ("operation_id", "uint64"),
        2: ("release_handles", "ReleaseHandles"),
        3: ("quiesce", "Quiesce"),
        4: ("drain_deadline_ms", "uint64"),
        5: ("ack_timeout_ms", "uint64"),
    },
    "ReleaseHandles": {1: ("path_prefix", "string")},
    "Quiesce": {1: ("reason", "QuiesceReason")},
    "BroadcastAck": {
        1: ("operation_id", "uint64"),
        2: ("status", "BroadcastAckStatus"),
        3: ("detail", "string"),
    },
    "BroadcastRequest": {
        1: ("release_handles", "ReleaseHandles"),
        2: ("quiesce", "Quiesce"),
        3: ("ack_timeout_ms", "uint64"),
    },
    "BroadcastReport": {1: ("json", "string")},
    "ServiceCommandRequest": {
        1: ("service_name", "string"),
        2: ("command", "ServiceCommand"),
        3: ("timeout_ms", "uint64"),
    },
    "ServiceCommandReport": {1: ("outcome", "ServiceCommandOutcome"), 2: ("json", "string")},
    "StreamRequest": {
        1: ("source", "StreamSource"),
        2: ("service_name", "string"),
        3: ("follow", "bool"),
    },
    "StreamRecord": {
        1: ("event_json", "string"),
        2: ("output_line", "BackendOutputLine"),
        3: ("dropped_before", "uint64"),
    },
    "BackendOutputLine": {
        1: ("service_name", "string"),
        2: ("service_version", "string"),
        3: ("pid", "uint32"),
        4: ("stream", "string"),
        5: ("text", "string"),
        6: ("at_unix_ms", "uint64"),
        7: ("truncated", "bool"),
    },
    "StreamEnd": {
        1: ("reason", "StreamEndReason"),
        2: ("dropped", "uint64"),
        3: ("detail", "string"),
    },
}


@pytest.mark.parametrize("name", sorted(LIFECYCLE_FIELDS))
def test_lifecycle_field_numbers_and_types(name: str) -> None:
    assert _field_shape(_message(_file_proto(lc), name)) == LIFECYCLE_FIELDS[name]


def test_oneofs_group_the_right_fields() -> None:
    assert [f.name for f in v1.HelloReply.DESCRIPTOR.oneofs_by_name["result"].fields] == [
        "negotiated",
        "refused",
    ]
    assert len(lc.LifecycleMessage.DESCRIPTOR.oneofs_by_name["body"].fields) == 11
    for name in ("BroadcastCommand", "BroadcastRequest"):
        oneof = lc.DESCRIPTOR.message_types_by_name[name].oneofs_by_name["operation"]
        assert [f.name for f in oneof.fields] == ["release_handles", "quiesce"]
    idle = v1.DaemonProcess.DESCRIPTOR.fields_by_name["idle_timeout_secs"]
    assert idle.has_presence


def test_package_and_syntax_are_frozen() -> None:
    assert _file_proto(v1).package == "running_process.broker.v1"
    assert _file_proto(v1).syntax == "proto3"
    assert _file_proto(lc).package == "rpbroker.lifecycle.v1"
    assert _file_proto(lc).syntax == "proto3"
    assert not _file_proto(lc).dependency  # the private lane does not import v1


# message name -> inclusive (first, last) reserved field ranges
MESSAGE_RESERVED = {
    "Frame": [(10, 15)],
    "Hello": [(16, 20)],
    "HandoffOffer": [(5, 10)],
    "HandoffAck": [(5, 10)],
    "AdminRequest": [(10, 20)],
    "AdminReply": [(10, 20)],
    "DaemonProcess": [(3, 3)],
}
ENUM_RESERVED = {
    "ErrorCode": [(10, 20)],
    "AdminVerb": [(10, 20)],
    "AdminReplyKind": [(10, 20)],
    "EventKind": [(21, 30), (31, 40), (41, 50)],
}


@pytest.mark.parametrize("name", sorted(MESSAGE_RESERVED))
def test_message_reserved_ranges_present(name: str) -> None:
    # DescriptorProto.ReservedRange.end is exclusive.
    got = [(r.start, r.end - 1) for r in _message(_file_proto(v1), name).reserved_range]
    assert got == MESSAGE_RESERVED[name]


@pytest.mark.parametrize("name", sorted(ENUM_RESERVED))
def test_enum_reserved_ranges_present(name: str) -> None:
    # EnumDescriptorProto.EnumReservedRange.end is inclusive.
    got = [(r.start, r.end) for r in _enum(_file_proto(v1), name).reserved_range]
    assert got == ENUM_RESERVED[name]


def test_reserved_ranges_are_declared_in_the_proto_text() -> None:
    source = (Path(wire.__file__).parent / "proto" / "broker_v1.proto").read_text("utf-8")
    for line in ("reserved 10 to 15;", "reserved 16 to 20;", "reserved 5 to 10;", "reserved 3;"):
        assert line in source


ENUM_PAIRS: list[tuple[Any, type[Any]]] = [
    (v1.FrameKind, codes.FrameKind),
    (v1.PayloadEncoding, codes.PayloadEncoding),
    (v1.ErrorCode, codes.RefusalCode),
    (v1.AdminVerb, codes.AdminVerb),
    (v1.AdminReplyKind, codes.AdminReplyKind),
    (v1.BrokerIsolation, codes.BrokerIsolation),
    (v1.EventKind, codes.EventKind),
    (lc.QuiesceReason, codes.QuiesceReason),
    (lc.BroadcastAckStatus, codes.BroadcastAckStatus),
    (lc.ServiceCommand, codes.ServiceCommand),
    (lc.ServiceCommandOutcome, codes.ServiceCommandOutcome),
    (lc.StreamSource, codes.StreamSource),
    (lc.StreamEndReason, codes.StreamEndReason),
]


@pytest.mark.parametrize("proto_enum,py_enum", ENUM_PAIRS, ids=[p.__name__ for _, p in ENUM_PAIRS])
def test_python_enums_match_proto_enums(proto_enum: Any, py_enum: type[Any]) -> None:
    proto_values = [(value.number, value.name) for value in proto_enum.DESCRIPTOR.values]
    py_values = [(member.value, member.name) for member in py_enum]
    assert [n for n, _ in proto_values] == [n for n, _ in py_values]
    for (_, proto_name), (_, py_name) in zip(proto_values, py_values, strict=True):
        assert proto_name.endswith(py_name)


def test_generated_package_is_importable_and_documented() -> None:
    assert _pb.__doc__ is not None
    assert "Do not edit" in _pb.__doc__
