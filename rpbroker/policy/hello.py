"""Hello checks: field shapes, version policy, per-peer rate limit, keepalive.

What this module does: the broker-side decisions about one decoded Hello that
need no I/O: validating its fields in the reference order with the reference
refusal codes and reasons, the service's version policy (minimum version that
ignores prerelease tags, exact allow-list), the per-verified-pid Hello rate
limit (256 per second by default) and the negotiated keepalive. Decisions are
``None`` (carry on) or a :class:`Refusal`, which carries the values that explain
it (``RefusalDetail`` keys: the rejected field, its value and grammar; the
wanted version and the service's version policy).

What it leaves to its caller: framing and decoding (frame-level refusals), the
service lookup, building the ``Refused`` message (daemon protocol range, echoed
request id and trace context) and reading the clock.

Validation is ASCII-only and measures lengths in UTF-8 bytes. It is written out
by hand rather than with ``re`` so that ``$`` never accepts a trailing newline.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final, Protocol

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s, ms_ceil
from rpbroker.wire.codes import PROTOCOL_VERSION, RefusalCode, RefusalDetail

#: Longest service name (bytes); names become file and endpoint names.
MAX_SERVICE_NAME_BYTES: Final[int] = 64
#: Longest ``wanted_version`` (bytes).
MAX_VERSION_BYTES: Final[int] = 64
#: Longest ``client_version`` (bytes).
MAX_CLIENT_VERSION_BYTES: Final[int] = 128
#: Longest ``client_lib_name`` / ``client_lib_version`` (bytes).
MAX_CLIENT_LIB_FIELD_BYTES: Final[int] = 64
#: Retry hint of a VERSION_BLOCKED refusal (ms): a version policy changes only when
#: an operator edits the service definition, so a fast retry cannot help.
VERSION_BLOCKED_RETRY_AFTER_MS: Final[int] = 30_000
#: Hellos allowed per verified pid per window.
DEFAULT_HELLO_RATE_LIMIT: Final[int] = 256
#: Hello rate-limit window (seconds).
DEFAULT_HELLO_RATE_WINDOW_S: Final[float] = 1.0
#: Keepalive (seconds) used when the client leaves ``client_keepalive_secs`` at 0.
DEFAULT_KEEPALIVE_SECS: Final[int] = 30 * 60

#: The service-name grammar, as quoted in refusals and client errors.
SERVICE_NAME_GRAMMAR: Final[str] = "[a-z0-9-]{1,64}"
#: The version grammar, as quoted in refusals and client errors.
VERSION_GRAMMAR: Final[str] = r"^[0-9]+\.[0-9]+\.[0-9]+(-[a-z0-9.]+)?$, at most 64 bytes"
#: Longest rejected value quoted back in a refusal, characters (after escaping):
#: any valid-length name or version (64) fits whole, while a hostile Hello field of
#: up to 64 KiB cannot inflate the refusal or the client's error message.
MAX_DETAIL_VALUE_CHARS: Final[int] = 80
#: Appended to a quoted value that was cut at ``MAX_DETAIL_VALUE_CHARS``.
TRUNCATION_MARK: Final[str] = "..."

REASON_PROTOCOL_RANGE: Final[str] = "client protocol range does not include v1"
REASON_INVALID_SERVICE_NAME: Final[str] = "invalid service_name"
REASON_INVALID_WANTED_VERSION: Final[str] = "invalid wanted_version"
REASON_CLIENT_VERSION_TOO_LONG: Final[str] = "client_version exceeds 128 bytes"
REASON_CLIENT_LIB_TOO_LONG: Final[str] = "client_lib fields exceed 64 bytes"
REASON_PEER_PID_MISMATCH: Final[str] = "peer_pid does not match verified peer"
REASON_BELOW_MIN_VERSION: Final[str] = "wanted_version is below min_version"
REASON_NOT_IN_ALLOW_LIST: Final[str] = "wanted_version is not in version_allow_list"
REASON_RATE_LIMITED: Final[str] = "Hello rate limit exceeded"

_SERVICE_NAME_CHARS: Final[frozenset[str]] = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_DIGITS: Final[frozenset[str]] = frozenset("0123456789")
_PRERELEASE_CHARS: Final[frozenset[str]] = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.")


def _read_only(details: Mapping[RefusalDetail, str]) -> Mapping[RefusalDetail, str]:
    return MappingProxyType(dict(details))


@attrs.frozen
class Refusal:
    """A decision to answer with ``Refused``: wire code, reason, optional retry hint.

    ``details`` holds the values that explain the refusal, for ``Refused.details``
    (read-only; empty for most refusals).
    """

    code: RefusalCode
    reason: str
    retry_after_ms: int | None = None
    details: Mapping[RefusalDetail, str] = attrs.field(
        factory=dict, converter=_read_only, hash=False
    )

    def wire_details(self) -> dict[str, str]:
        """``details`` with plain string keys, as ``Refused.details`` carries them."""
        return {key.value: value for key, value in self.details.items()}


def quoted_value(text: str, limit: int = MAX_DETAIL_VALUE_CHARS) -> str:
    """``text`` made safe to echo: printable ASCII, at most ``limit`` characters.

    Anything outside printable ASCII (and the backslash) is written as its Python
    escape (``\\n``, ``\\x1b``, ``\\u00e9``), so control characters never reach a
    terminal and the result is valid UTF-8 whatever the input. Escapes are never
    cut in half: the text stops before the first piece that would pass ``limit``
    and ``TRUNCATION_MARK`` follows.
    """
    pieces: list[str] = []
    used = 0
    for char in text:
        piece = char if " " <= char <= "~" and char != "\\" else ascii(char)[1:-1]
        if used + len(piece) > limit:
            pieces.append(TRUNCATION_MARK)
            break
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces)


def _rejected_field(reason: str, field: str, value: str, grammar: str) -> Refusal:
    return Refusal(
        RefusalCode.PEER_REJECTED,
        reason,
        details={
            RefusalDetail.FIELD: field,
            RefusalDetail.VALUE: quoted_value(value),
            RefusalDetail.GRAMMAR: grammar,
        },
    )


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def is_valid_service_name(name: str) -> bool:
    """True when ``name`` is 1 to 64 characters of ``a-z``, ``0-9`` and ``-``.

    Uppercase is rejected, not folded. (All allowed characters are ASCII, so the
    character count is the byte count.)
    """
    return 0 < len(name) <= MAX_SERVICE_NAME_BYTES and all(c in _SERVICE_NAME_CHARS for c in name)


def is_valid_semver(version: str) -> bool:
    """True for ``MAJOR.MINOR.PATCH`` with an optional ``-prerelease``, at most 64 bytes.

    The core is three non-empty runs of ASCII digits (leading zeros allowed, no
    size limit); the optional part after the first ``-`` is non-empty and made of
    ``a-z``, ``0-9`` and ``.``. Build metadata (``+``), a ``v`` prefix, uppercase
    and any whitespace are rejected.
    """
    if _utf8_len(version) > MAX_VERSION_BYTES:
        return False
    core, dash, prerelease = version.partition("-")
    parts = core.split(".")
    if len(parts) != 3:
        return False
    if not all(part and all(c in _DIGITS for c in part) for part in parts):
        return False
    if dash:
        return bool(prerelease) and all(c in _PRERELEASE_CHARS for c in prerelease)
    return True


def semver_core(version: str) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of a valid version (prerelease dropped), else None."""
    if not is_valid_semver(version):
        return None
    major, minor, patch = version.partition("-")[0].split(".")
    return int(major), int(minor), int(patch)


class HelloLike(Protocol):
    """The Hello fields the shape check reads (the generated message satisfies it)."""

    @property
    def client_min_protocol(self) -> int: ...
    @property
    def client_max_protocol(self) -> int: ...
    @property
    def service_name(self) -> str: ...
    @property
    def wanted_version(self) -> str: ...
    @property
    def client_version(self) -> str: ...
    @property
    def client_lib_name(self) -> str: ...
    @property
    def client_lib_version(self) -> str: ...
    @property
    def peer_pid(self) -> int: ...


def check_hello_shape(hello: HelloLike, verified_pid: int) -> Refusal | None:
    """Validate a decoded Hello against the kernel-verified peer pid.

    Checked in order, first failure wins: protocol range includes v1
    (VERSION_UNSUPPORTED); service name; wanted version; client_version length;
    client_lib field lengths; claimed pid equals verified pid when both are
    non-zero (the rest PEER_REJECTED).
    """
    if hello.client_min_protocol > PROTOCOL_VERSION or hello.client_max_protocol < PROTOCOL_VERSION:
        return Refusal(RefusalCode.VERSION_UNSUPPORTED, REASON_PROTOCOL_RANGE)
    if not is_valid_service_name(hello.service_name):
        return _rejected_field(
            REASON_INVALID_SERVICE_NAME, "service_name", hello.service_name, SERVICE_NAME_GRAMMAR
        )
    if not is_valid_semver(hello.wanted_version):
        return _rejected_field(
            REASON_INVALID_WANTED_VERSION, "wanted_version", hello.wanted_version, VERSION_GRAMMAR
        )
    if _utf8_len(hello.client_version) > MAX_CLIENT_VERSION_BYTES:
        return Refusal(RefusalCode.PEER_REJECTED, REASON_CLIENT_VERSION_TOO_LONG)
    if (
        _utf8_len(hello.client_lib_name) > MAX_CLIENT_LIB_FIELD_BYTES
        or _utf8_len(hello.client_lib_version) > MAX_CLIENT_LIB_FIELD_BYTES
    ):
        return Refusal(RefusalCode.PEER_REJECTED, REASON_CLIENT_LIB_TOO_LONG)
    if hello.peer_pid != 0 and verified_pid != 0 and hello.peer_pid != verified_pid:
        return Refusal(RefusalCode.PEER_REJECTED, REASON_PEER_PID_MISMATCH)
    return None


def _empty_as_none(value: str | None) -> str | None:
    return value or None


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class VersionPolicy:
    """A service's version policy.

    ``min_version`` (empty means unset): a wanted version whose numeric core is
    below it is blocked; prerelease tags are ignored, and an unparsable version on
    either side counts as "not below". ``allow_list``: when non-empty, only exact
    string matches pass.
    """

    min_version: str | None = attrs.field(default=None, converter=_empty_as_none)
    allow_list: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)

    def check(self, wanted: str) -> Refusal | None:
        """None when ``wanted`` passes; else a VERSION_BLOCKED refusal (retry 30 s).

        The refusal's details name the wanted version and the whole policy (floor
        and allow-list, each when set), so the client can pick a version that passes.
        """
        if self.min_version is not None:
            floor = semver_core(self.min_version)
            core = semver_core(wanted)
            if floor is not None and core is not None and core < floor:
                return self._blocked(REASON_BELOW_MIN_VERSION, wanted)
        if self.allow_list and wanted not in self.allow_list:
            return self._blocked(REASON_NOT_IN_ALLOW_LIST, wanted)
        return None

    def _blocked(self, reason: str, wanted: str) -> Refusal:
        details = {RefusalDetail.WANTED_VERSION: quoted_value(wanted)}
        if self.min_version is not None:
            details[RefusalDetail.MIN_VERSION] = self.min_version
        if self.allow_list:
            details[RefusalDetail.VERSION_ALLOW_LIST] = ",".join(self.allow_list)
        return Refusal(
            RefusalCode.VERSION_BLOCKED, reason, VERSION_BLOCKED_RETRY_AFTER_MS, details=details
        )


@attrs.define
class _RateWindow:
    started_at: float
    count: int


class HelloRateLimiter:
    """Fixed-window Hello rate limit per verified pid.

    A count below 1 becomes 1, a non-positive window 1 ms. pid 0 (credentials
    unavailable) is never limited. Refused Hellos do not count against the
    budget. Windows are kept in start order and run-out ones are dropped from the
    front on every check, so memory holds only pids seen within the last window
    and each check is O(1) amortised.
    """

    __slots__ = ("_max_per_window", "_window_s", "_windows")

    def __init__(
        self,
        max_per_window: int = DEFAULT_HELLO_RATE_LIMIT,
        window_s: float = DEFAULT_HELLO_RATE_WINDOW_S,
    ) -> None:
        self._max_per_window = clamp_count(max_per_window)
        self._window_s = clamp_duration_s(window_s)
        self._windows: OrderedDict[int, _RateWindow] = OrderedDict()

    def __len__(self) -> int:
        """Pids currently tracked."""
        return len(self._windows)

    def check(self, pid: int, now: float) -> Refusal | None:
        """Count one Hello from ``pid``; a RATE_LIMITED refusal when over the limit.

        ``retry_after_ms`` is the rest of the window in whole milliseconds, at
        least 1.
        """
        self._drop_run_out(now)
        if pid == 0:
            return None
        window = self._windows.get(pid)
        if window is None or now - window.started_at >= self._window_s:
            self._windows[pid] = _RateWindow(started_at=now, count=1)
            self._windows.move_to_end(pid)
            return None
        if window.count < self._max_per_window:
            window.count += 1
            return None
        remaining = self._window_s - max(0.0, now - window.started_at)
        return Refusal(RefusalCode.RATE_LIMITED, REASON_RATE_LIMITED, max(1, ms_ceil(remaining)))

    def _drop_run_out(self, now: float) -> None:
        windows = self._windows
        while windows:
            first_pid = next(iter(windows))
            if now - windows[first_pid].started_at < self._window_s:
                break
            windows.popitem(last=False)


def negotiated_keepalive(client_secs: int) -> int:
    """The keepalive to negotiate: the client's value, or 1800 s when it sent 0."""
    return client_secs if client_secs > 0 else DEFAULT_KEEPALIVE_SECS
