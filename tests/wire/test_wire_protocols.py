"""The payload-protocol registry: frozen ids, documented ranges, collision checks."""

from __future__ import annotations

import itertools

import pytest

from rpbroker.wire import protocols
from rpbroker.wire.protocols import (
    FIRST_PARTY_PAYLOAD_PROTOCOLS,
    KNOWN_ENTRIES,
    KNOWN_PROTOCOLS,
    PROTOCOL_RANGES,
    PayloadProtocol,
    ProtocolOrigin,
    ProtocolRegistryError,
    check_registry,
    protocol_name,
    range_of,
)


def test_payload_protocol_ids_are_frozen() -> None:
    assert {p.name: p.value for p in PayloadProtocol} == {
        "CONTROL": 0x0000,
        "ADMIN": 0xAD01,
        "PROBE": 0xB232,
        "HANDOFF": 0xD0FF,
        "LIFECYCLE": 0xF1C0,
    }
    assert FIRST_PARTY_PAYLOAD_PROTOCOLS == (0x0000, 0xAD01, 0xB232, 0xD0FF)


def test_ranges_cover_sixteen_bits_in_order_without_gaps() -> None:
    assert PROTOCOL_RANGES[0].first == 0
    assert PROTOCOL_RANGES[-1].last == 0xFFFF
    for before, after in itertools.pairwise(PROTOCOL_RANGES):
        assert after.first == before.last + 1
    assert [(r.first, r.last) for r in PROTOCOL_RANGES] == [
        (0x0000, 0x6FFF),
        (0x7000, 0x7EFF),
        (0x7F00, 0xEFFF),
        (0xF000, 0xFFFF),
    ]


@pytest.mark.parametrize(
    "protocol_id,range_name",
    [
        (0x0000, "first-party"),
        (0x5350, "first-party"),
        (0x7A63, "registered-consumers"),
        (0x7C4C, "registered-consumers"),
        (0x7EB1, "registered-consumers"),
        (0x7F00, "reserved"),
        (0xAD01, "reserved"),  # frozen first-party ids predate the range table
        (0xF1C0, "private-use"),
        (0xFFFF, "private-use"),
    ],
)
def test_range_of(protocol_id: int, range_name: str) -> None:
    assert range_of(protocol_id).name == range_name


@pytest.mark.parametrize("protocol_id", [-1, 0x10000])
def test_range_of_rejects_ids_outside_sixteen_bits(protocol_id: int) -> None:
    with pytest.raises(ProtocolRegistryError):
        range_of(protocol_id)


def test_known_registry_is_consistent() -> None:
    check_registry()
    check_registry(KNOWN_ENTRIES)


def test_lifecycle_lane_is_private_and_rpbroker_owned() -> None:
    lifecycle = next(p for p in KNOWN_PROTOCOLS if p.protocol_id == PayloadProtocol.LIFECYCLE)
    assert lifecycle.origin is ProtocolOrigin.RPBROKER
    assert lifecycle.name.startswith(protocols.RPBROKER_NAME_PREFIX)
    assert range_of(lifecycle.protocol_id) is protocols.PRIVATE_USE_RANGE


def test_session_is_known_but_not_first_party() -> None:
    session = next(p for p in KNOWN_PROTOCOLS if p.name == "session")
    assert session.protocol_id == 0x5350
    assert session.origin is ProtocolOrigin.V2_ONLY
    assert 0x5350 not in FIRST_PARTY_PAYLOAD_PROTOCOLS


def test_every_payload_protocol_is_registered() -> None:
    registered = {p.protocol_id for p in KNOWN_PROTOCOLS}
    assert set(PayloadProtocol) <= registered


def test_collision_is_detected() -> None:
    with pytest.raises(ProtocolRegistryError, match=r"0xAD01 already registered to admin"):
        check_registry([*KNOWN_ENTRIES, ("my-lane", 0xAD01)])


def test_duplicate_name_is_detected() -> None:
    with pytest.raises(ProtocolRegistryError, match="name registered twice"):
        check_registry([("lane", 0x7001), ("lane", 0x7002)])


@pytest.mark.parametrize("protocol_id", [-1, 0x10000, 0xFFFFFFFF])
def test_out_of_range_id_is_detected(protocol_id: int) -> None:
    with pytest.raises(ProtocolRegistryError, match="outside 0x0000-0xFFFF"):
        check_registry([("wide", protocol_id)])


def test_rpbroker_lane_outside_private_range_is_detected() -> None:
    with pytest.raises(ProtocolRegistryError, match="outside the private-use range"):
        check_registry([("rpbroker.extra", 0x7000)])
    check_registry([("rpbroker.extra", 0xF001)])


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ProtocolRegistryError) as caught:
        check_registry([("a", 1), ("b", 1), ("rpbroker.c", 2), ("d", -5)])
    message = str(caught.value)
    assert "already registered to a" in message
    assert "rpbroker.c" in message
    assert "d:" in message


def test_protocol_names() -> None:
    assert protocol_name(0xD0FF) == "handoff"
    assert protocol_name(PayloadProtocol.ADMIN) == "admin"
    assert protocol_name(0xF1C0) == "rpbroker.lifecycle"
    assert protocol_name(0x7A63) == "zccache"
    assert protocol_name(0x1234) == "0x1234"
