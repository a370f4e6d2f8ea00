"""Lifecycle broadcast operations, collector and result (seed 004)."""

from __future__ import annotations

import json

import attrs
import pytest

from rpbroker.policy.broadcast import (
    DEFAULT_BROADCAST_ACK_TIMEOUT_S,
    BackendAcked,
    BackendFailed,
    BackendSkippedDead,
    BackendSkippedNoControl,
    BackendTimedOut,
    BroadcastCollector,
    BroadcastFailure,
    BroadcastResult,
    Quiesce,
    QuiesceReason,
    ReleaseHandles,
)

RELEASE = ReleaseHandles("/work/cache")


@attrs.frozen
class Key:
    service: str
    version: str

    def to_json(self) -> dict[str, str]:
        return {"service": self.service, "version": self.version}


def test_default_broadcast_ack_timeout_is_five_seconds() -> None:
    assert DEFAULT_BROADCAST_ACK_TIMEOUT_S == 5.0
    result = BroadcastCollector(RELEASE, ["a"]).result()
    assert result.timeouts == (BackendTimedOut("a", 5.0),)


@pytest.mark.parametrize("timeout_s", [0.0, -2.0, float("nan")])
def test_collector_clamps_a_non_positive_timeout_to_one_millisecond(timeout_s: float) -> None:
    result = BroadcastCollector(RELEASE, ["a"], ack_timeout_s=timeout_s).result()
    assert result.timeouts == (BackendTimedOut("a", 0.001),)
    assert result.to_json()["timeouts"] == [{"backend": "a", "timeout_ms": 1}]


def test_collector_keeps_a_positive_timeout() -> None:
    result = BroadcastCollector(RELEASE, ["a"], ack_timeout_s=0.25).result()
    assert result.timeouts == (BackendTimedOut("a", 0.25),)


def test_collector_knows_its_operation() -> None:
    assert BroadcastCollector(RELEASE, []).operation == RELEASE


def test_all_acks_reach_every_live_backend() -> None:
    collector = BroadcastCollector(RELEASE, ["a", "b", "c"])
    for name in ("a", "b", "c"):
        assert collector.record(BackendAcked(name))
    result = collector.result()
    assert result.operation == RELEASE
    assert result.acks == (BackendAcked("a"), BackendAcked("b"), BackendAcked("c"))
    assert result.sent_count == 3
    assert result.all_live_backends_acked


def test_skipped_dead_backends_are_not_sent_and_timeouts_fail_the_broadcast() -> None:
    collector = BroadcastCollector(RELEASE, ["live", "dead", "slow"], ack_timeout_s=0.25)
    collector.record(BackendAcked("live"))
    collector.record(BackendSkippedDead("dead"))
    result = collector.result()
    assert result.acks == (BackendAcked("live"),)
    assert result.skipped_dead == (BackendSkippedDead("dead"),)
    assert result.timeouts == (BackendTimedOut("slow", 0.25),)
    assert result.sent_count == 2
    assert not result.all_live_backends_acked


def test_dead_backends_alone_count_as_all_acked() -> None:
    collector = BroadcastCollector(RELEASE, ["dead"])
    collector.record(BackendSkippedDead("dead"))
    result = collector.result()
    assert result.sent_count == 0
    assert result.all_live_backends_acked


def test_failures_are_reported_and_do_not_stop_the_others() -> None:
    collector = BroadcastCollector(RELEASE, ["first", "second", "third"])
    rejected = BroadcastFailure.REJECTED
    collector.record(BackendFailed("first", rejected, rejected.default_detail))
    collector.record(BackendFailed("second", BroadcastFailure.UNSUPPORTED_OPERATION))
    collector.record(BackendAcked("third"))
    result = collector.result()
    assert [f.backend for f in result.failures] == ["first", "second"]
    assert result.failures[0].failure is BroadcastFailure.REJECTED
    assert result.failures[0].detail == "backend rejected the lifecycle operation"
    assert result.failures[1].detail == ""
    assert result.acks == (BackendAcked("third"),)
    assert result.sent_count == 3
    assert not result.all_live_backends_acked


def test_failure_default_details() -> None:
    assert {f.value: f.default_detail for f in BroadcastFailure} == {
        "unsupported_operation": "backend does not support this lifecycle operation",
        "rejected": "backend rejected the lifecycle operation",
        "backend_error": "backend failed while handling the lifecycle operation",
    }


def test_quiesce_result_carries_its_operation() -> None:
    operation = Quiesce(QuiesceReason.MAINTENANCE)
    collector = BroadcastCollector(operation, ["a", "b"])
    collector.record(BackendAcked("a"))
    collector.record(BackendFailed("b", BroadcastFailure.BACKEND_ERROR))
    result = collector.result()
    assert result.operation == operation
    assert result.sent_count == 2


def test_empty_broadcast() -> None:
    result = BroadcastCollector[str](RELEASE, []).result()
    assert result == BroadcastResult(RELEASE)
    assert result.sent_count == 0
    assert result.all_live_backends_acked


def test_result_lists_follow_registration_order() -> None:
    names = [f"b{i}" for i in range(10)]
    collector = BroadcastCollector(RELEASE, names)
    for name in names[1::2]:
        collector.record(BackendAcked(name))
    result = collector.result()
    assert [a.backend for a in result.acks] == names[1::2]
    assert [t.backend for t in result.timeouts] == names[0::2]


def test_collector_counts_missing_backends_as_timed_out() -> None:
    collector = BroadcastCollector(RELEASE, ["a", "b", "c", "d"], ack_timeout_s=2.0)
    assert collector.record(BackendFailed("c", BroadcastFailure.BACKEND_ERROR, "boom"))
    assert collector.record(BackendAcked("a"))
    result = collector.result()
    assert result == BroadcastResult(
        RELEASE,
        acks=(BackendAcked("a"),),
        timeouts=(BackendTimedOut("b", 2.0), BackendTimedOut("d", 2.0)),
        failures=(BackendFailed("c", BroadcastFailure.BACKEND_ERROR, "boom"),),
    )


def test_collector_first_outcome_wins_and_unknown_backend_raises() -> None:
    collector = BroadcastCollector(Quiesce(QuiesceReason.BROKER_SHUTDOWN), ["a", "b"])
    assert collector.record(BackendTimedOut("a", 5.0))
    assert collector.record(BackendAcked("a")) is False  # late ack ignored
    assert collector.record(BackendSkippedDead("b"))
    result = collector.result()
    assert result.timeouts == (BackendTimedOut("a", 5.0),)
    assert result.skipped_dead == (BackendSkippedDead("b"),)
    assert result.acks == ()
    with pytest.raises(KeyError):
        collector.record(BackendAcked("zzz"))


def test_collector_result_can_be_taken_before_and_after_more_outcomes() -> None:
    collector = BroadcastCollector(RELEASE, ["a"])
    assert collector.result().timeouts == (BackendTimedOut("a", 5.0),)
    collector.record(BackendAcked("a"))
    assert collector.result().acks == (BackendAcked("a"),)


def test_collector_preserves_insertion_order_whatever_the_arrival_order() -> None:
    backends = [f"b{i}" for i in range(20)]
    collector = BroadcastCollector(RELEASE, backends)
    for name in reversed(backends):
        collector.record(BackendAcked(name))
    assert [a.backend for a in collector.result().acks] == backends


def test_collector_ignores_duplicate_targets() -> None:
    collector = BroadcastCollector(RELEASE, ["a", "a", "b"])
    result = collector.result()
    assert result.timeouts == (BackendTimedOut("a", 5.0), BackendTimedOut("b", 5.0))


def test_result_to_json_is_json_ready() -> None:
    key = Key("zccache", "1.0.0")
    collector = BroadcastCollector(
        Quiesce(QuiesceReason.IDLE_TIMEOUT), [key, "slow", 7, ("dead", 1)], ack_timeout_s=0.25
    )
    collector.record(BackendAcked(key))
    rejected = BroadcastFailure.REJECTED
    collector.record(BackendFailed(7, rejected, rejected.default_detail))
    collector.record(BackendSkippedDead(("dead", 1)))
    data = collector.result().to_json()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "operation": {"op": "quiesce", "reason": "idle_timeout"},
        "sent_count": 3,
        "all_live_backends_acked": False,
        "acks": [{"service": "zccache", "version": "1.0.0"}],
        "timeouts": [{"backend": "slow", "timeout_ms": 250}],
        "failures": [
            {
                "backend": 7,
                "failure": "rejected",
                "detail": BroadcastFailure.REJECTED.default_detail,
            }
        ],
        "skipped_dead": ["('dead', 1)"],
        "skipped_no_control_channel": [],
    }


def test_a_live_backend_without_control_channel_is_skipped_and_not_acked() -> None:
    collector = BroadcastCollector(RELEASE, ["sdk", "foreign"], ack_timeout_s=1.0)
    collector.record(BackendAcked("sdk"))
    collector.record(BackendSkippedNoControl("foreign", "no control channel"))
    result = collector.result()
    assert result.sent_count == 1  # nothing was sent to the foreign one
    assert result.skipped_no_control == (BackendSkippedNoControl("foreign", "no control channel"),)
    assert not result.all_live_backends_acked
    assert result.to_json()["skipped_no_control_channel"] == [
        {"backend": "foreign", "detail": "no control channel"}
    ]


def test_operation_json() -> None:
    assert RELEASE.to_json() == {"op": "release_handles", "path_prefix": "/work/cache"}
    assert Quiesce(QuiesceReason.BROKER_SHUTDOWN).to_json() == {
        "op": "quiesce",
        "reason": "broker_shutdown",
    }
    assert [r.value for r in QuiesceReason] == ["idle_timeout", "broker_shutdown", "maintenance"]


def test_backend_json_shows_bools_as_text_and_numbers_as_themselves() -> None:
    collector = BroadcastCollector(RELEASE, [True, 1.5])
    collector.record(BackendAcked(True))
    collector.record(BackendAcked(1.5))
    assert collector.result().to_json()["acks"] == ["True", 1.5]
