"""Lifecycle broadcast model, collector and result (seed 004)."""

from __future__ import annotations

import json

import attrs
import pytest

from rpbroker.policy.broadcast import (
    DEFAULT_BROADCAST_ACK_TIMEOUT_S,
    BackendAcked,
    BackendFailed,
    BackendSkippedDead,
    BackendTimedOut,
    BroadcastCollector,
    BroadcastFailure,
    BroadcastPolicy,
    BroadcastResult,
    InMemoryBroadcastModel,
    Quiesce,
    QuiesceReason,
    ReleaseHandles,
    ScriptedResponse,
    backend_json,
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
    assert BroadcastPolicy().ack_timeout_s == 5.0
    assert BroadcastPolicy(0.0).ack_timeout_s == 0.001


def test_broadcast_release_handles_reaches_all_live_backends() -> None:
    model = InMemoryBroadcastModel()
    for name in ("a", "b", "c"):
        model.register(name)
    result = model.release_handles("/work/cache")
    assert result.operation == RELEASE
    assert result.acks == (BackendAcked("a"), BackendAcked("b"), BackendAcked("c"))
    assert result.sent_count == 3
    assert result.all_live_backends_acked
    for name in ("a", "b", "c"):
        assert model.received(name) == (RELEASE,)


def test_broadcast_skips_dead_backends_and_reports_timeouts() -> None:
    model = InMemoryBroadcastModel(BroadcastPolicy(0.25))
    model.register("live")
    model.register("dead", alive=False)
    model.register("slow", ScriptedResponse.TIMEOUT)
    result = model.broadcast(RELEASE)
    assert result.acks == (BackendAcked("live"),)
    assert result.skipped_dead == (BackendSkippedDead("dead"),)
    assert result.timeouts == (BackendTimedOut("slow", 0.25),)
    assert result.sent_count == 2
    assert not result.all_live_backends_acked
    assert model.received("dead") == ()
    assert model.received("slow") == (RELEASE,)


def test_broadcast_keeps_broadcasting_after_backend_failure() -> None:
    model = InMemoryBroadcastModel()
    model.register("first", BroadcastFailure.REJECTED)
    model.register("second", BroadcastFailure.UNSUPPORTED_OPERATION)
    model.register("third")
    result = model.broadcast(RELEASE)
    assert [f.backend for f in result.failures] == ["first", "second"]
    assert result.failures[0].failure is BroadcastFailure.REJECTED
    assert result.failures[0].detail == BroadcastFailure.REJECTED.default_detail
    assert result.acks == (BackendAcked("third"),)
    assert result.sent_count == 3


def test_broadcast_quiesce_uses_same_lifecycle_fanout_model() -> None:
    model = InMemoryBroadcastModel()
    model.register("a")
    model.register("b", BroadcastFailure.BACKEND_ERROR)
    result = model.quiesce(QuiesceReason.MAINTENANCE)
    assert result.operation == Quiesce(QuiesceReason.MAINTENANCE)
    assert result.sent_count == 2
    assert model.received("a") == (Quiesce(QuiesceReason.MAINTENANCE),)


def test_registering_same_backend_replaces_in_place() -> None:
    model = InMemoryBroadcastModel()
    model.register("a")
    model.register("b")
    model.broadcast(RELEASE)
    assert model.register("a", alive=False) is True
    assert model.register("c") is False
    assert model.backends() == ["a", "b", "c"]
    assert model.received("a") == ()
    result = model.broadcast(RELEASE)
    assert result.skipped_dead == (BackendSkippedDead("a"),)


def test_set_alive_set_response_and_remove() -> None:
    model = InMemoryBroadcastModel()
    model.register("a")
    model.set_alive("a", False)
    assert not model.is_alive("a")
    assert model.broadcast(RELEASE).skipped_dead == (BackendSkippedDead("a"),)
    model.set_alive("a", True)
    model.set_response("a", ScriptedResponse.TIMEOUT)
    assert len(model.broadcast(RELEASE).timeouts) == 1
    assert model.remove("a") is True
    assert model.remove("a") is False
    empty = model.broadcast(RELEASE)
    assert empty.sent_count == 0
    assert empty.all_live_backends_acked
    with pytest.raises(KeyError):
        model.set_alive("a", True)


def test_result_lists_follow_registration_order() -> None:
    model = InMemoryBroadcastModel()
    names = [f"b{i}" for i in range(10)]
    for i, name in enumerate(names):
        model.register(name, ScriptedResponse.ACK if i % 2 else ScriptedResponse.TIMEOUT)
    result = model.broadcast(RELEASE)
    assert [a.backend for a in result.acks] == names[1::2]
    assert [t.backend for t in result.timeouts] == names[0::2]


def test_collector_counts_missing_backends_as_timed_out() -> None:
    collector = BroadcastCollector(RELEASE, ["a", "b", "c", "d"], BroadcastPolicy(2.0))
    assert collector.record(BackendFailed("c", BroadcastFailure.BACKEND_ERROR, "boom"))
    assert collector.record(BackendAcked("a"))
    assert collector.pending() == ["b", "d"]
    assert not collector.is_complete
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
    assert collector.is_complete
    result = collector.result()
    assert result.timeouts == (BackendTimedOut("a", 5.0),)
    assert result.skipped_dead == (BackendSkippedDead("b"),)
    assert result.acks == ()
    with pytest.raises(KeyError):
        collector.record(BackendAcked("zzz"))


def test_collector_preserves_insertion_order_whatever_the_arrival_order() -> None:
    backends = [f"b{i}" for i in range(20)]
    collector = BroadcastCollector(RELEASE, backends)
    for name in reversed(backends):
        collector.record(BackendAcked(name))
    assert [a.backend for a in collector.result().acks] == backends


def test_collector_ignores_duplicate_targets() -> None:
    collector = BroadcastCollector(RELEASE, ["a", "a", "b"])
    assert collector.pending() == ["a", "b"]


def test_result_to_json_is_json_ready() -> None:
    model = InMemoryBroadcastModel(BroadcastPolicy(0.25))
    model.register(Key("zccache", "1.0.0"))
    model.register("slow", ScriptedResponse.TIMEOUT)
    model.register(7, BroadcastFailure.REJECTED)
    model.register(("dead", 1), alive=False)
    data = model.quiesce(QuiesceReason.IDLE_TIMEOUT).to_json()
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
    }


def test_operation_json() -> None:
    assert RELEASE.to_json() == {"op": "release_handles", "path_prefix": "/work/cache"}
    assert backend_json(True) == "True"
    assert backend_json(1.5) == 1.5
