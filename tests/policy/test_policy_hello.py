"""Hello shape checks, version policy, rate limit and keepalive (facts §5.4, §5.5, §10)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest

from rpbroker.policy.hello import (
    DEFAULT_HELLO_RATE_LIMIT,
    DEFAULT_HELLO_RATE_WINDOW_S,
    DEFAULT_KEEPALIVE_SECS,
    MAX_DETAIL_VALUE_CHARS,
    REASON_RATE_LIMITED,
    SERVICE_NAME_GRAMMAR,
    TRUNCATION_MARK,
    VERSION_GRAMMAR,
    HelloRateLimiter,
    Refusal,
    VersionPolicy,
    check_hello_shape,
    is_valid_semver,
    is_valid_service_name,
    negotiated_keepalive,
    quoted_value,
    semver_core,
)
from rpbroker.wire.codes import RefusalCode, RefusalDetail


@attrs.frozen
class FakeHello:
    client_min_protocol: int = 1
    client_max_protocol: int = 1
    service_name: str = "zccache"
    wanted_version: str = "1.2.3"
    client_version: str = "0.1.0"
    client_lib_name: str = "rpbroker"
    client_lib_version: str = "0.1.0"
    peer_pid: int = 4242


def rejected(reason: str) -> Refusal:
    return Refusal(RefusalCode.PEER_REJECTED, reason)


# -- service names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zccache", "a", "0", "-", "my-svc-2", "a" * 64, "x-" * 32])
def test_valid_service_names(name: str) -> None:
    assert is_valid_service_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        "Zccache",
        "zc_cache",
        "zccache.service",
        "../zccache",
        "..\\zccache",
        "zccache/service",
        "zc cache",
        "zccache;rm",
        "$(id)",
        "zccache\n",
        "zc\u0441ache",  # Cyrillic es
        "zccaché",
        "zc\x00",
    ],
)
def test_invalid_service_names(name: str) -> None:
    assert not is_valid_service_name(name)


# -- semver ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    [
        "0.0.1",
        "1.2.3",
        "1.2.3-alpha.1",
        "01.002.0003",
        "1.10.0-rc.1",
        "1.0.0-a..b",
        "9" * 60 + ".1.1",
    ],
)
def test_valid_versions(version: str) -> None:
    assert is_valid_semver(version)


@pytest.mark.parametrize(
    "version",
    [
        "",
        "1",
        "1.2",
        "1.2.3.4",
        "v1.0.0",
        "1.0.0-",
        "1.0.0-rc-1",
        "1.0.0-ALPHA",
        "1.0.0+build",
        "1.0.0-alpha+build",
        "1.0.0; rm -rf /",
        "$(reboot)",
        "1.0.0-../../evil",
        "1.0.0..evil",
        "1..0",
        ".1.0",
        "1.0.0\n",
        "1.0.0 ",
        " 1.0.0",
        "1.0.0-rc\n",
        "\uff11.0.0",  # fullwidth digit one
        "\u0661.0.0",  # Arabic-Indic digit one
        "1.0.0-" + "a" * 59,  # 65 bytes
    ],
)
def test_invalid_versions(version: str) -> None:
    assert not is_valid_semver(version)


def test_version_length_bound_is_in_bytes() -> None:
    assert is_valid_semver("1.0.0-" + "a" * 58)  # 64 bytes
    assert len(("1.0.0-" + "a" * 58).encode()) == 64


def test_semver_core() -> None:
    assert semver_core("1.10.0-rc.1") == (1, 10, 0)
    assert semver_core("01.2.3") == (1, 2, 3)
    assert semver_core("v1.2.3") is None
    assert semver_core("1.2") is None


# -- shape check ----------------------------------------------------------------------


def test_valid_hello_passes() -> None:
    assert check_hello_shape(FakeHello(), verified_pid=4242) is None


@pytest.mark.parametrize(("lo", "hi"), [(2, 2), (0, 0), (99, 99), (2, 5)])
def test_hello_rejects_protocol_skew(lo: int, hi: int) -> None:
    refusal = check_hello_shape(FakeHello(client_min_protocol=lo, client_max_protocol=hi), 4242)
    assert refusal == Refusal(
        RefusalCode.VERSION_UNSUPPORTED, "client protocol range does not include v1"
    )


def test_protocol_range_including_v1_passes() -> None:
    assert check_hello_shape(FakeHello(client_min_protocol=0, client_max_protocol=7), 4242) is None


def test_hello_rejects_invalid_service_name_naming_field_value_and_grammar() -> None:
    assert check_hello_shape(FakeHello(service_name="Bad"), 4242) == Refusal(
        RefusalCode.PEER_REJECTED,
        "invalid service_name",
        details={
            RefusalDetail.FIELD: "service_name",
            RefusalDetail.VALUE: "Bad",
            RefusalDetail.GRAMMAR: "[a-z0-9-]{1,64}",
        },
    )


def test_hello_rejects_invalid_wanted_version_naming_field_value_and_grammar() -> None:
    refusal = check_hello_shape(FakeHello(wanted_version="1.0"), 4242)
    assert refusal == Refusal(
        RefusalCode.PEER_REJECTED,
        "invalid wanted_version",
        details={
            RefusalDetail.FIELD: "wanted_version",
            RefusalDetail.VALUE: "1.0",
            RefusalDetail.GRAMMAR: VERSION_GRAMMAR,
        },
    )
    assert refusal.wire_details() == {
        "field": "wanted_version",
        "value": "1.0",
        "grammar": r"^[0-9]+\.[0-9]+\.[0-9]+(-[a-z0-9.]+)?$, at most 64 bytes",
    }


def test_hostile_field_is_quoted_escaped_and_truncated() -> None:
    hostile = "\x1b[2J../../etc/passwd;rm -rf ~\n" + "é" * 10_000
    refusal = check_hello_shape(FakeHello(service_name=hostile), 4242)
    assert refusal is not None
    value = refusal.details[RefusalDetail.VALUE]
    assert value.startswith("\\x1b[2J../../etc/passwd;rm -rf ~\\n\\xe9")
    assert value.endswith(TRUNCATION_MARK)
    assert len(value) <= MAX_DETAIL_VALUE_CHARS + len(TRUNCATION_MARK)
    assert value.isascii() and value.isprintable()
    assert refusal.details[RefusalDetail.GRAMMAR] == SERVICE_NAME_GRAMMAR


def test_other_shape_refusals_carry_no_details() -> None:
    refusal = check_hello_shape(FakeHello(client_version="x" * 129), 4242)
    assert refusal is not None and refusal.details == {}


def test_client_version_limit_is_128_bytes() -> None:
    assert check_hello_shape(FakeHello(client_version="x" * 128), 4242) is None
    assert check_hello_shape(FakeHello(client_version="x" * 129), 4242) == rejected(
        "client_version exceeds 128 bytes"
    )
    # Measured in bytes: 43 three-byte characters are 129 bytes.
    assert check_hello_shape(FakeHello(client_version="€" * 43), 4242) == rejected(
        "client_version exceeds 128 bytes"
    )


@pytest.mark.parametrize(
    ("ok", "bad"),
    [
        (FakeHello(client_lib_name="y" * 64), FakeHello(client_lib_name="y" * 65)),
        (FakeHello(client_lib_version="y" * 64), FakeHello(client_lib_version="y" * 65)),
    ],
)
def test_client_lib_fields_limit_is_64_bytes(ok: FakeHello, bad: FakeHello) -> None:
    assert check_hello_shape(ok, 4242) is None
    assert check_hello_shape(bad, 4242) == rejected("client_lib fields exceed 64 bytes")


def test_hello_rejects_peer_pid_mismatch() -> None:
    assert check_hello_shape(FakeHello(peer_pid=1), 2) == rejected(
        "peer_pid does not match verified peer"
    )


def test_hello_accepts_claimed_pid_when_kernel_peer_pid_unavailable() -> None:
    assert check_hello_shape(FakeHello(peer_pid=1), 0) is None
    assert check_hello_shape(FakeHello(peer_pid=0), 77) is None


def test_shape_checks_run_in_reference_order() -> None:
    everything_wrong = FakeHello(
        client_min_protocol=5,
        client_max_protocol=5,
        service_name="BAD",
        wanted_version="bad",
        client_version="x" * 500,
        client_lib_name="x" * 500,
        peer_pid=1,
    )
    expected = [
        "client protocol range does not include v1",
        "invalid service_name",
        "invalid wanted_version",
        "client_version exceeds 128 bytes",
        "client_lib fields exceed 64 bytes",
        "peer_pid does not match verified peer",
    ]
    hello = everything_wrong
    fixes: list[Callable[[FakeHello], FakeHello]] = [
        lambda h: attrs.evolve(h, client_min_protocol=1, client_max_protocol=1),
        lambda h: attrs.evolve(h, service_name="ok"),
        lambda h: attrs.evolve(h, wanted_version="1.0.0"),
        lambda h: attrs.evolve(h, client_version=""),
        lambda h: attrs.evolve(h, client_lib_name=""),
        lambda h: attrs.evolve(h, peer_pid=2),
    ]
    for reason, fix in zip(expected, fixes, strict=True):
        refusal = check_hello_shape(hello, verified_pid=2)
        assert refusal is not None
        assert refusal.reason == reason
        hello = fix(hello)
    assert check_hello_shape(hello, verified_pid=2) is None


# -- version policy -------------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    assert VersionPolicy().check("0.0.1") is None
    assert VersionPolicy(min_version="").check("0.0.1") is None


def test_hello_rejects_version_below_floor() -> None:
    policy = VersionPolicy(min_version="1.10.0")
    assert policy.check("1.9.9") == Refusal(
        RefusalCode.VERSION_BLOCKED,
        "wanted_version is below min_version",
        30_000,
        details={RefusalDetail.WANTED_VERSION: "1.9.9", RefusalDetail.MIN_VERSION: "1.10.0"},
    )
    assert policy.check("1.10.0") is None
    assert policy.check("1.11.0") is None
    assert policy.check("2.0.0") is None


def test_floor_comparison_is_numeric_not_lexical() -> None:
    assert VersionPolicy(min_version="1.10.0").check("1.2.0") is not None
    assert VersionPolicy(min_version="1.2.0").check("1.10.0") is None


def test_prerelease_is_ignored_against_floor() -> None:
    policy = VersionPolicy(min_version="1.10.0")
    assert policy.check("1.10.0-rc.1") is None
    assert VersionPolicy(min_version="1.10.0-rc.1").check("1.10.0") is None


def test_unparsable_versions_count_as_not_below() -> None:
    assert VersionPolicy(min_version="garbage").check("0.0.1") is None
    assert VersionPolicy(min_version="1.0.0").check("garbage") is None


def test_hello_rejects_version_outside_allow_list() -> None:
    policy = VersionPolicy(allow_list=("1.10.0", "1.11.0"))
    assert policy.check("1.11.0") is None
    assert policy.check("1.12.0") == Refusal(
        RefusalCode.VERSION_BLOCKED,
        "wanted_version is not in version_allow_list",
        30_000,
        details={
            RefusalDetail.WANTED_VERSION: "1.12.0",
            RefusalDetail.VERSION_ALLOW_LIST: "1.10.0,1.11.0",
        },
    )
    # Exact string equality: the prerelease matters here.
    assert policy.check("1.11.0-rc.1") is not None


def test_floor_is_checked_before_allow_list() -> None:
    policy = VersionPolicy(min_version="2.0.0", allow_list=("1.0.0",))
    refusal = policy.check("1.0.0")
    assert refusal is not None
    assert refusal.reason == "wanted_version is below min_version"
    # The details describe the whole policy, not only the rule that fired.
    assert refusal.wire_details() == {
        "wanted_version": "1.0.0",
        "min_version": "2.0.0",
        "version_allow_list": "1.0.0",
    }


# -- quoting rejected values ----------------------------------------------------------


@pytest.mark.parametrize("text", ["a" * 64, "1.2.3-rc.1", "my-svc", ""])
def test_quoted_value_keeps_printable_ascii_whole(text: str) -> None:
    assert quoted_value(text) == text


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("a\nb", "a\\nb"),
        ("\x00", "\\x00"),
        ("\\", "\\\\"),
        ("€", "\\u20ac"),
        ("\U0001f600", "\\U0001f600"),
    ],
)
def test_quoted_value_escapes_everything_else(text: str, quoted: str) -> None:
    assert quoted_value(text) == quoted


def test_quoted_value_never_cuts_an_escape_in_half() -> None:
    # Each "é" becomes 4 characters; a limit of 10 fits two (8), not a third.
    assert quoted_value("ééé", limit=10) == "\\xe9\\xe9" + TRUNCATION_MARK
    assert quoted_value("a" * 11, limit=10) == "a" * 10 + TRUNCATION_MARK
    assert quoted_value("a" * 10, limit=10) == "a" * 10


# -- rate limit -----------------------------------------------------------------------


def test_hello_rate_limit_refuses_after_peer_budget() -> None:
    limiter = HelloRateLimiter(max_per_window=8, window_s=1.0)
    assert all(limiter.check(100, 0.0) is None for _ in range(8))
    refusal = limiter.check(100, 0.25)
    assert refusal == Refusal(RefusalCode.RATE_LIMITED, "Hello rate limit exceeded", 750)


def test_hello_rate_limit_default_is_256_per_second() -> None:
    assert (DEFAULT_HELLO_RATE_LIMIT, DEFAULT_HELLO_RATE_WINDOW_S) == (256, 1.0)
    limiter = HelloRateLimiter()
    assert all(limiter.check(5, 0.0) is None for _ in range(256))
    assert limiter.check(5, 0.0) == Refusal(RefusalCode.RATE_LIMITED, REASON_RATE_LIMITED, 1000)
    assert limiter.check(5, 0.999) is not None
    assert limiter.check(5, 1.0) is None  # a one-second window


def test_hello_rate_limit_is_per_peer_pid() -> None:
    limiter = HelloRateLimiter(max_per_window=1)
    assert limiter.check(1, 0.0) is None
    assert limiter.check(2, 0.0) is None
    assert limiter.check(1, 0.0) is not None


def test_hello_rate_limit_skips_unknown_verified_pid() -> None:
    limiter = HelloRateLimiter(max_per_window=1)
    assert all(limiter.check(0, 0.0) is None for _ in range(1000))
    assert len(limiter) == 0


def test_rate_limit_window_resets_when_elapsed() -> None:
    limiter = HelloRateLimiter(max_per_window=1, window_s=1.0)
    limiter.check(9, 0.0)
    assert limiter.check(9, 0.999) is not None
    assert limiter.check(9, 1.0) is None
    assert limiter.check(9, 1.5) is not None


def test_rate_limit_retry_after_is_at_least_one_ms() -> None:
    limiter = HelloRateLimiter(max_per_window=1, window_s=1.0)
    limiter.check(9, 0.0)
    refusal = limiter.check(9, 0.9999999)
    assert refusal is not None
    assert refusal.retry_after_ms == 1


def test_refused_hellos_do_not_extend_the_window() -> None:
    limiter = HelloRateLimiter(max_per_window=2, window_s=1.0)
    for _ in range(10):
        limiter.check(3, 0.5)
    assert limiter.check(3, 1.5) is None
    assert limiter.check(3, 1.5) is None
    assert limiter.check(3, 1.5) is not None


def test_rate_limit_zero_configuration_clamps() -> None:
    limiter = HelloRateLimiter(max_per_window=0, window_s=0.0)
    assert limiter.check(9, 0.0) is None
    refusal = limiter.check(9, 0.0005)  # one per window
    assert refusal is not None
    assert refusal.retry_after_ms == 1
    assert limiter.check(9, 0.001) is None  # a 1 ms window


def test_rate_limiter_memory_is_bounded_by_recent_pids() -> None:
    limiter = HelloRateLimiter(max_per_window=4, window_s=1.0)
    for pid in range(1, 10_001):
        limiter.check(pid, pid * 0.001)
    assert len(limiter) <= 1001
    limiter.check(1, 100.0)
    assert len(limiter) == 1


# -- keepalive ------------------------------------------------------------------------


def test_keepalive_default_and_echo() -> None:
    assert DEFAULT_KEEPALIVE_SECS == 1800
    assert negotiated_keepalive(0) == 1800
    assert negotiated_keepalive(60) == 60
    assert negotiated_keepalive(10**9) == 10**9
