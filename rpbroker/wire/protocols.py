"""The registry of ``Frame.payload_protocol`` ids rpbroker knows, with a collision check.

What this module does: names every payload protocol (lane) rpbroker sends or
recognises, records the documented id ranges, says which range an id falls in,
and checks a set of registrations for duplicate ids or names, ids outside
16 bits, and rpbroker-private lanes outside the private-use range. The known
registry is checked once at import, so a collision fails loudly and early.

What it does not do: route frames to handlers, or validate envelopes
(``rpbroker.wire.frames.check_envelope`` does that).

Note on ranges: the four frozen first-party ids (0xAD01, 0xB232, 0xD0FF besides
0x0000) predate the range table and lie outside 0x0000-0x6FFF; ``range_of``
reports where an id falls numerically and the checks do not move them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

import attrs

#: Largest payload protocol id: ``payload_protocol`` is a uint32 on the wire, but
#: v1 assigns ids only in 16 bits (0x0000-0xFFFF).
MAX_PROTOCOL_ID: Final = 0xFFFF

#: Registry names starting with this are rpbroker's own lanes; they must sit in the
#: private-use range so they can never collide with a running-process assignment.
RPBROKER_NAME_PREFIX: Final = "rpbroker."


class PayloadProtocol(enum.IntEnum):
    """The lanes rpbroker itself speaks."""

    CONTROL = 0x0000  # Hello / HelloReply
    ADMIN = 0xAD01  # AdminRequest / AdminReply
    PROBE = 0xB232  # endpoint identity probe: 32-byte nonce -> nonce + DaemonProcess
    HANDOFF = 0xD0FF  # HandoffOffer / HandoffAck / handoff-ready relay
    LIFECYCLE = 0xF1C0  # rpbroker's private lifecycle-control lane (rpbroker_lifecycle.proto)


@attrs.frozen
class ProtocolRange:
    """A documented block of payload protocol ids (inclusive bounds)."""

    name: str
    first: int
    last: int
    purpose: str

    def __contains__(self, protocol_id: object) -> bool:
        return isinstance(protocol_id, int) and self.first <= protocol_id <= self.last


FIRST_PARTY_RANGE: Final = ProtocolRange(
    "first-party", 0x0000, 0x6FFF, "lanes defined by running-process itself"
)
REGISTERED_CONSUMER_RANGE: Final = ProtocolRange(
    "registered-consumers", 0x7000, 0x7EFF, "lanes of registered consumer projects"
)
RESERVED_RANGE: Final = ProtocolRange("reserved", 0x7F00, 0xEFFF, "unassigned; reserved")
PRIVATE_USE_RANGE: Final = ProtocolRange(
    "private-use", 0xF000, 0xFFFF, "never assigned upstream; free for local lanes"
)

#: The documented ranges, ascending and covering 0x0000-0xFFFF without gaps.
PROTOCOL_RANGES: Final[tuple[ProtocolRange, ...]] = (
    FIRST_PARTY_RANGE,
    REGISTERED_CONSUMER_RANGE,
    RESERVED_RANGE,
    PRIVATE_USE_RANGE,
)


class ProtocolOrigin(enum.Enum):
    """Who assigned a known id."""

    FIRST_PARTY = "running-process v1 first-party lane"
    V2_ONLY = "running-process v2 lane; known, not a v1 first-party lane"
    CONSUMER = "registered consumer lane"
    RPBROKER = "rpbroker private lane"


@attrs.frozen
class KnownProtocol:
    """One registered payload protocol."""

    name: str
    protocol_id: int
    origin: ProtocolOrigin


#: Everything rpbroker knows about, in id order within each origin.
KNOWN_PROTOCOLS: Final[tuple[KnownProtocol, ...]] = (
    KnownProtocol("control", PayloadProtocol.CONTROL, ProtocolOrigin.FIRST_PARTY),
    KnownProtocol("admin", PayloadProtocol.ADMIN, ProtocolOrigin.FIRST_PARTY),
    KnownProtocol("probe", PayloadProtocol.PROBE, ProtocolOrigin.FIRST_PARTY),
    KnownProtocol("handoff", PayloadProtocol.HANDOFF, ProtocolOrigin.FIRST_PARTY),
    KnownProtocol("session", 0x5350, ProtocolOrigin.V2_ONLY),
    KnownProtocol("zccache", 0x7A63, ProtocolOrigin.CONSUMER),
    KnownProtocol("clud", 0x7C4C, ProtocolOrigin.CONSUMER),
    KnownProtocol("fbuild", 0x7EB1, ProtocolOrigin.CONSUMER),
    KnownProtocol("rpbroker.lifecycle", PayloadProtocol.LIFECYCLE, ProtocolOrigin.RPBROKER),
)

#: The v1 first-party lanes, as upstream lists them (SESSION is not among them).
FIRST_PARTY_PAYLOAD_PROTOCOLS: Final[tuple[PayloadProtocol, ...]] = (
    PayloadProtocol.CONTROL,
    PayloadProtocol.ADMIN,
    PayloadProtocol.PROBE,
    PayloadProtocol.HANDOFF,
)

#: ``KNOWN_PROTOCOLS`` as the ``(name, id)`` pairs ``check_registry`` takes.
KNOWN_ENTRIES: Final[tuple[tuple[str, int], ...]] = tuple(
    (known.name, known.protocol_id) for known in KNOWN_PROTOCOLS
)

_NAMES: Final[dict[int, str]] = {known.protocol_id: known.name for known in KNOWN_PROTOCOLS}


class ProtocolRegistryError(ValueError):
    """A registration set is inconsistent, or an id is not a 16-bit protocol id."""


def range_of(protocol_id: int) -> ProtocolRange:
    """The documented range ``protocol_id`` falls in."""
    for block in PROTOCOL_RANGES:
        if protocol_id in block:
            return block
    raise ProtocolRegistryError(
        f"payload protocol 0x{protocol_id:X} is outside 0x0000-0x{MAX_PROTOCOL_ID:04X}"
        if protocol_id >= 0
        else f"payload protocol {protocol_id} is negative"
    )


def protocol_name(protocol_id: int) -> str:
    """The registry name (``handoff``, ``rpbroker.lifecycle`` ...) or ``0xNNNN`` if unknown."""
    name = _NAMES.get(protocol_id)
    return name if name is not None else f"0x{protocol_id:04X}"


def check_registry(entries: Iterable[tuple[str, int]] = KNOWN_ENTRIES) -> None:
    """Raise ``ProtocolRegistryError`` listing every problem in ``entries``.

    Problems: an id outside 0..0xFFFF, an id or a name registered twice, and a
    name starting with ``rpbroker.`` whose id is outside the private-use range.
    """
    problems: list[str] = []
    by_id: dict[int, str] = {}
    names: set[str] = set()
    for name, protocol_id in entries:
        if not 0 <= protocol_id <= MAX_PROTOCOL_ID:
            problems.append(f"{name}: id {protocol_id:#x} is outside 0x0000-0xFFFF")
            continue
        if protocol_id in by_id:
            problems.append(
                f"{name}: id 0x{protocol_id:04X} already registered to {by_id[protocol_id]}"
            )
        else:
            by_id[protocol_id] = name
        if name in names:
            problems.append(f"{name}: name registered twice")
        names.add(name)
        if name.startswith(RPBROKER_NAME_PREFIX) and protocol_id not in PRIVATE_USE_RANGE:
            problems.append(
                f"{name}: rpbroker lane 0x{protocol_id:04X} is outside the private-use range "
                f"0x{PRIVATE_USE_RANGE.first:04X}-0x{PRIVATE_USE_RANGE.last:04X}"
            )
    if problems:
        raise ProtocolRegistryError("payload protocol registry: " + "; ".join(problems))


check_registry()
