"""One backend incarnation's life: the whole transition table, scenarios, properties.

- the table test walks every (phase, input type) pair of ``TRANSITIONS`` and checks
  the phase, the exact actions, the flags and the timer the lifecycle answers with
  against the documented text (and fails when a phase or input is added without a
  documented result);
- scenario tests follow whole lives (spawn to exit) through every way one can end;
- hypothesis feeds random input sequences, in any order at increasing times, and
  checks the guarantees the broker builds on: unroutable once gone, one settle and
  one outcome per life, SIGKILL at the latest when the kill grace ends, and a timer
  exactly where one is documented.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, get_args

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpbroker.policy.lifecycle import (
    DEFAULT_TERMINATE_GRACE_S,
    LINK_LOSS_GRACE_S,
    TRANSITIONS,
    Action,
    BackendLifecycle,
    BeganDraining,
    BeganStopping,
    Crashed,
    Ended,
    ForceKill,
    Input,
    Kill,
    Launched,
    LaunchFailed,
    LinkClosed,
    NeverReady,
    Phase,
    ProcessExited,
    QuiesceSent,
    ReadinessCheckFailed,
    ReadyReported,
    SettleSpawn,
    SpawnFailure,
    Step,
    StopCause,
    Stopped,
    StopRequested,
    Terminate,
    TimerFired,
)

READY_TIMEOUT_S = 5.0
PID = 4242
INF = math.inf

INPUT_TYPES: frozenset[type[Any]] = frozenset(get_args(Input))


def lifecycle() -> BackendLifecycle:
    return BackendLifecycle(ready_timeout_s=READY_TIMEOUT_S)


def feed_all(lc: BackendLifecycle, events: Iterable[tuple[Input, float]]) -> list[Action]:
    """Feed ``(input, now)`` pairs in order; return every action, in order."""
    actions: list[Action] = []
    for event, now in events:
        actions.extend(lc.feed(event, now).actions)
    return actions


def count(actions: Sequence[Action], kind: type[Any]) -> int:
    return sum(1 for action in actions if isinstance(action, kind))


# -- the table ------------------------------------------------------------------------

#: How to reach each phase: inputs fed at t=0 to a fresh lifecycle. The deadlines
#: this leaves: STARTING 5.0 (ready ceiling), DRAINING 8.0 (drain deadline),
#: STOPPING 2.0 (SIGTERM sent, kill grace 2 s, stop cause REQUESTED).
PREFIXES: dict[Phase, tuple[Input, ...]] = {
    Phase.LAUNCHING: (),
    Phase.STARTING: (Launched(PID),),
    Phase.RUNNING: (Launched(PID), ReadyReported()),
    Phase.DRAINING: (Launched(PID), ReadyReported(), QuiesceSent(drain_deadline=8.0)),
    Phase.STOPPING: (
        Launched(PID),
        ReadyReported(),
        StopRequested(StopCause.REQUESTED, grace_s=2.0),
    ),
    Phase.EXITED: (LaunchFailed("no such file"),),
}

#: When the table's input is fed: TimerFired at the phase's deadline when it has
#: one (as the shell feeds it), every other input at NOW.
NOW = 1.0

#: One representative input of each type.
REPRESENTATIVE: dict[type[Any], Input] = {
    Launched: Launched(200),
    LaunchFailed: LaunchFailed("no such file"),
    ReadyReported: ReadyReported(),
    ReadinessCheckFailed: ReadinessCheckFailed("connection refused"),
    LinkClosed: LinkClosed(),
    ProcessExited: ProcessExited(3),
    QuiesceSent: QuiesceSent(drain_deadline=NOW + 20.0),
    StopRequested: StopRequested(StopCause.REQUESTED, grace_s=2.0),
    ForceKill: ForceKill(),
    TimerFired: TimerFired(),
}

#: (routable, starting, exited) in each phase.
FLAGS: dict[Phase, tuple[bool, bool, bool]] = {
    Phase.LAUNCHING: (False, True, False),
    Phase.STARTING: (False, True, False),
    Phase.RUNNING: (True, False, False),
    Phase.DRAINING: (False, False, False),
    Phase.STOPPING: (False, False, False),
    Phase.EXITED: (False, False, True),
}


@attrs.frozen
class Expected:
    phase: Phase
    actions: tuple[Action, ...]
    deadline: float


def unchanged(phase: Phase, deadline: float = INF) -> Expected:
    return Expected(phase, (), deadline)


EXITED_BEFORE_READY = "exited with status 3 before becoming ready"

EXPECTED: dict[tuple[Phase, type[Any]], Expected] = {
    # LAUNCHING: nothing exists yet; only the launch result moves it.
    (Phase.LAUNCHING, Launched): Expected(Phase.STARTING, (), NOW + READY_TIMEOUT_S),
    (Phase.LAUNCHING, ReadinessCheckFailed): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, LaunchFailed): Expected(
        Phase.EXITED,
        (
            SettleSpawn(SpawnFailure.LAUNCH_ERROR, "no such file"),
            Kill(),
            Ended(NeverReady(SpawnFailure.LAUNCH_ERROR, "no such file", None)),
        ),
        INF,
    ),
    (Phase.LAUNCHING, ReadyReported): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, LinkClosed): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, ProcessExited): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, QuiesceSent): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, StopRequested): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, ForceKill): unchanged(Phase.LAUNCHING),
    (Phase.LAUNCHING, TimerFired): unchanged(Phase.LAUNCHING),
    # STARTING (ready ceiling at 5.0).
    (Phase.STARTING, Launched): unchanged(Phase.STARTING, 5.0),
    (Phase.STARTING, ReadinessCheckFailed): unchanged(Phase.STARTING, 5.0),
    (Phase.STARTING, LaunchFailed): unchanged(Phase.STARTING, 5.0),
    (Phase.STARTING, ReadyReported): Expected(Phase.RUNNING, (SettleSpawn(None),), INF),
    (Phase.STARTING, LinkClosed): Expected(
        Phase.STOPPING, (BeganStopping(StopCause.LINK_LOST),), NOW + LINK_LOSS_GRACE_S
    ),
    (Phase.STARTING, ProcessExited): Expected(
        Phase.EXITED,
        (
            SettleSpawn(SpawnFailure.EXITED_BEFORE_READY, EXITED_BEFORE_READY),
            Kill(),
            Ended(NeverReady(SpawnFailure.EXITED_BEFORE_READY, EXITED_BEFORE_READY, 3)),
        ),
        INF,
    ),
    (Phase.STARTING, QuiesceSent): unchanged(Phase.STARTING, 5.0),
    (Phase.STARTING, StopRequested): Expected(
        Phase.STOPPING,
        (
            BeganStopping(StopCause.REQUESTED),
            Kill(),
            SettleSpawn(SpawnFailure.CANCELLED, "spawn cancelled"),
        ),
        INF,
    ),
    (Phase.STARTING, ForceKill): Expected(
        Phase.STOPPING,
        (
            BeganStopping(StopCause.BROKER_SHUTDOWN),
            Kill(),
            SettleSpawn(SpawnFailure.CANCELLED, "spawn cancelled"),
        ),
        INF,
    ),
    (Phase.STARTING, TimerFired): Expected(
        Phase.STOPPING,
        (
            BeganStopping(StopCause.READY_TIMEOUT),
            Kill(),
            SettleSpawn(SpawnFailure.READY_TIMEOUT, "not ready within 5 s"),
        ),
        INF,
    ),
    # RUNNING (no timer).
    (Phase.RUNNING, Launched): unchanged(Phase.RUNNING),
    (Phase.RUNNING, ReadinessCheckFailed): unchanged(Phase.RUNNING),
    (Phase.RUNNING, LaunchFailed): unchanged(Phase.RUNNING),
    (Phase.RUNNING, ReadyReported): unchanged(Phase.RUNNING),
    (Phase.RUNNING, LinkClosed): Expected(
        Phase.STOPPING, (BeganStopping(StopCause.LINK_LOST),), NOW + LINK_LOSS_GRACE_S
    ),
    (Phase.RUNNING, ProcessExited): Expected(
        Phase.EXITED, (Kill(), Ended(Crashed(3, link_lost_first=False))), INF
    ),
    (Phase.RUNNING, QuiesceSent): Expected(Phase.DRAINING, (BeganDraining(),), NOW + 20.0),
    (Phase.RUNNING, StopRequested): Expected(
        Phase.STOPPING, (BeganStopping(StopCause.REQUESTED), Terminate()), NOW + 2.0
    ),
    (Phase.RUNNING, ForceKill): Expected(
        Phase.STOPPING, (BeganStopping(StopCause.BROKER_SHUTDOWN), Kill()), INF
    ),
    (Phase.RUNNING, TimerFired): unchanged(Phase.RUNNING),
    # DRAINING (drain deadline at 8.0).
    (Phase.DRAINING, Launched): unchanged(Phase.DRAINING, 8.0),
    (Phase.DRAINING, ReadinessCheckFailed): unchanged(Phase.DRAINING, 8.0),
    (Phase.DRAINING, LaunchFailed): unchanged(Phase.DRAINING, 8.0),
    (Phase.DRAINING, ReadyReported): unchanged(Phase.DRAINING, 8.0),
    (Phase.DRAINING, LinkClosed): unchanged(Phase.DRAINING, 8.0),
    (Phase.DRAINING, ProcessExited): Expected(Phase.EXITED, (Kill(), Ended(Stopped(3, None))), INF),
    (Phase.DRAINING, QuiesceSent): unchanged(Phase.DRAINING, 8.0),
    (Phase.DRAINING, StopRequested): Expected(
        Phase.STOPPING, (BeganStopping(StopCause.REQUESTED), Terminate()), NOW + 2.0
    ),
    (Phase.DRAINING, ForceKill): Expected(
        Phase.STOPPING, (BeganStopping(StopCause.BROKER_SHUTDOWN), Kill()), INF
    ),
    (Phase.DRAINING, TimerFired): Expected(
        Phase.STOPPING,
        (BeganStopping(StopCause.DRAIN_DEADLINE), Terminate()),
        8.0 + DEFAULT_TERMINATE_GRACE_S,
    ),
    # STOPPING (SIGTERM sent, kill at 2.0, cause REQUESTED).
    (Phase.STOPPING, Launched): unchanged(Phase.STOPPING, 2.0),
    (Phase.STOPPING, ReadinessCheckFailed): unchanged(Phase.STOPPING, 2.0),
    (Phase.STOPPING, LaunchFailed): unchanged(Phase.STOPPING, 2.0),
    (Phase.STOPPING, ReadyReported): unchanged(Phase.STOPPING, 2.0),
    (Phase.STOPPING, LinkClosed): unchanged(Phase.STOPPING, 2.0),
    (Phase.STOPPING, ProcessExited): Expected(
        Phase.EXITED, (Kill(), Ended(Stopped(3, StopCause.REQUESTED))), INF
    ),
    (Phase.STOPPING, QuiesceSent): unchanged(Phase.STOPPING, 2.0),
    # A later kill time (NOW + 2.0 = 3.0) loses to the earlier one (2.0).
    (Phase.STOPPING, StopRequested): unchanged(Phase.STOPPING, 2.0),
    (Phase.STOPPING, ForceKill): Expected(Phase.STOPPING, (Kill(),), INF),
    (Phase.STOPPING, TimerFired): Expected(Phase.STOPPING, (Kill(),), INF),
    # EXITED: terminal.
    **{(Phase.EXITED, kind): unchanged(Phase.EXITED) for kind in INPUT_TYPES},
}

ALL_PAIRS: frozenset[tuple[Phase, type[Any]]] = frozenset(
    (phase, kind) for phase in Phase for kind in INPUT_TYPES
)


def table_order(pair: tuple[Phase, type[Any]]) -> tuple[int, str]:
    return list(Phase).index(pair[0]), pair[1].__name__


TABLE: list[tuple[Phase, type[Any]]] = sorted(ALL_PAIRS, key=table_order)


def in_phase(phase: Phase) -> BackendLifecycle:
    lc = lifecycle()
    feed_all(lc, ((event, 0.0) for event in PREFIXES[phase]))
    assert lc.phase is phase
    return lc


def test_transitions_document_every_phase_and_input() -> None:
    assert set(TRANSITIONS) == ALL_PAIRS
    assert all(TRANSITIONS.values())
    assert set(REPRESENTATIVE) == INPUT_TYPES
    assert set(EXPECTED) == ALL_PAIRS


def test_prefixes_reach_their_phase_with_the_documented_timer() -> None:
    assert {phase: in_phase(phase).deadline for phase in Phase} == {
        Phase.LAUNCHING: INF,
        Phase.STARTING: READY_TIMEOUT_S,
        Phase.RUNNING: INF,
        Phase.DRAINING: 8.0,
        Phase.STOPPING: 2.0,
        Phase.EXITED: INF,
    }


def check_against_text(text: str, step: Step, deadline: float) -> None:
    """The parts of a TRANSITIONS text that can be checked mechanically."""
    if text.startswith("-"):
        # "-" (with or without a remark): ignored, nothing changes.
        assert step.actions == ()
        return
    head = text.split(" | ")[0]
    first_word = head.replace("+", " ").replace(":", " ").split()[0]
    if first_word in Phase.__members__:
        assert step.phase is Phase[first_word]
    kinds = {type(action) for action in step.actions}
    if "+Kill" in head or first_word == "Kill":
        assert Kill in kinds
    if "+Terminate" in head:
        assert Terminate in kinds
    if "settle failed" in head or "settle ready" in head:
        assert SettleSpawn in kinds
    if "settles failed at the exit" in head:
        assert SettleSpawn not in kinds
    if "timer" in head:
        assert math.isfinite(deadline)
    if first_word == "EXITED":
        assert isinstance(step.actions[-1], Ended)


@pytest.mark.parametrize(
    ("phase", "kind"),
    TABLE,
    ids=lambda value: value.name if isinstance(value, Phase) else value.__name__,
)
def test_every_transition(phase: Phase, kind: type[Any]) -> None:
    lc = in_phase(phase)
    deadline_before = lc.deadline
    event = REPRESENTATIVE[kind]
    now = deadline_before if kind is TimerFired and math.isfinite(deadline_before) else NOW
    step = lc.feed(event, now)
    expected = EXPECTED[(phase, kind)]
    assert step.phase is expected.phase
    assert lc.phase is expected.phase
    assert step.actions == expected.actions
    assert lc.deadline == expected.deadline
    assert (lc.routable, lc.starting, lc.exited) == FLAGS[expected.phase]
    check_against_text(TRANSITIONS[(phase, kind)], step, lc.deadline)
    if TRANSITIONS[(phase, kind)].startswith("-"):
        assert (lc.phase, lc.deadline) == (phase, deadline_before)


def test_flags_follow_the_phase_only() -> None:
    # routable only in RUNNING, starting while a spawn is in progress, exited at the end.
    for phase in Phase:
        lc = in_phase(phase)
        assert (lc.routable, lc.starting, lc.exited) == FLAGS[phase]


def test_constants() -> None:
    assert DEFAULT_TERMINATE_GRACE_S == 1.0
    assert LINK_LOSS_GRACE_S == 1.0
    assert StopRequested(StopCause.REQUESTED).grace_s == DEFAULT_TERMINATE_GRACE_S
    assert ForceKill().cause is StopCause.BROKER_SHUTDOWN


# -- scenarios ------------------------------------------------------------------------


def test_pid_is_known_once_launched() -> None:
    lc = lifecycle()
    assert lc.pid == 0
    lc.feed(Launched(PID), 0.0)
    assert lc.pid == PID


def test_spawn_ready_quiesce_exit_is_stopped() -> None:
    lc = lifecycle()
    assert lc.feed(Launched(PID), 0.0) == Step(Phase.STARTING)
    assert lc.starting and not lc.routable
    assert lc.feed(ReadyReported(), 0.5) == Step(Phase.RUNNING, (SettleSpawn(None),))
    assert lc.routable and not lc.starting
    assert lc.deadline == INF
    assert lc.feed(QuiesceSent(drain_deadline=10.0), 3.0) == Step(
        Phase.DRAINING, (BeganDraining(),)
    )
    assert not lc.routable
    assert lc.deadline == 10.0
    assert lc.feed(LinkClosed(), 4.0) == Step(Phase.DRAINING)  # it closes its link as it exits
    assert lc.feed(ProcessExited(0), 4.0) == Step(Phase.EXITED, (Kill(), Ended(Stopped(0, None))))
    assert lc.exited and lc.deadline == INF


def test_ready_then_exit_is_a_crash() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1)])
    assert lc.feed(ProcessExited(-11), 7.0) == Step(
        Phase.EXITED, (Kill(), Ended(Crashed(-11, link_lost_first=False, killed=False)))
    )


def test_ready_then_link_closed_then_exit_is_a_crash_with_link_lost_first() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1)])
    step = lc.feed(LinkClosed(), 2.0)
    assert step == Step(Phase.STOPPING, (BeganStopping(StopCause.LINK_LOST),))
    assert not lc.routable
    assert lc.deadline == 2.0 + LINK_LOSS_GRACE_S
    assert lc.feed(ProcessExited(1), 2.01) == Step(
        Phase.EXITED, (Kill(), Ended(Crashed(1, link_lost_first=True, killed=False)))
    )


def test_ready_then_link_closed_then_grace_over_is_killed() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (LinkClosed(), 2.0)])
    assert lc.feed(TimerFired(), 3.0) == Step(Phase.STOPPING, (Kill(),))
    assert lc.deadline == INF  # after SIGKILL only the exit ends STOPPING
    assert lc.feed(ProcessExited(-9), 3.01) == Step(
        Phase.EXITED, (Kill(), Ended(Crashed(-9, link_lost_first=True, killed=True)))
    )


def test_starting_then_link_closed_then_own_exit_reports_its_status() -> None:
    lc = lifecycle()
    lc.feed(Launched(PID), 0.0)
    step = lc.feed(LinkClosed(), 0.2)
    # Unsettled for now: the spawn settles at the exit, with the useful reason.
    assert step == Step(Phase.STOPPING, (BeganStopping(StopCause.LINK_LOST),))
    assert not lc.starting
    assert lc.deadline == 0.2 + LINK_LOSS_GRACE_S
    detail = "exited with status 2 before becoming ready"
    assert lc.feed(ProcessExited(2), 0.25) == Step(
        Phase.EXITED,
        (
            SettleSpawn(SpawnFailure.LINK_CLOSED_BEFORE_READY, detail),
            Kill(),
            Ended(NeverReady(SpawnFailure.LINK_CLOSED_BEFORE_READY, detail, 2)),
        ),
    )


def test_starting_then_link_closed_then_grace_over_is_killed() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (LinkClosed(), 0.2)])
    assert lc.feed(TimerFired(), 1.2) == Step(Phase.STOPPING, (Kill(),))
    assert lc.deadline == INF
    detail = "closed its control channel before becoming ready, and was killed"
    assert lc.feed(ProcessExited(-9), 1.3) == Step(
        Phase.EXITED,
        (
            SettleSpawn(SpawnFailure.LINK_CLOSED_BEFORE_READY, detail),
            Kill(),
            Ended(NeverReady(SpawnFailure.LINK_CLOSED_BEFORE_READY, detail, -9)),
        ),
    )


def test_starting_then_link_closed_ignores_a_late_ready() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (LinkClosed(), 0.2)])
    assert lc.feed(ReadyReported(), 0.3) == Step(Phase.STOPPING)
    assert not lc.routable


def test_ready_timeout_kills_and_settles_once() -> None:
    lc = lifecycle()
    lc.feed(Launched(PID), 10.0)
    assert lc.deadline == 10.0 + READY_TIMEOUT_S
    detail = "not ready within 5 s"
    assert lc.feed(TimerFired(), 15.0) == Step(
        Phase.STOPPING,
        (
            BeganStopping(StopCause.READY_TIMEOUT),
            Kill(),
            SettleSpawn(SpawnFailure.READY_TIMEOUT, detail),
        ),
    )
    assert lc.deadline == INF
    assert lc.feed(ReadyReported(), 15.1) == Step(Phase.STOPPING)  # too late
    assert lc.feed(ProcessExited(-9), 15.2) == Step(
        Phase.EXITED, (Kill(), Ended(NeverReady(SpawnFailure.READY_TIMEOUT, detail, -9)))
    )


def test_ready_timeout_detail_shows_the_configured_ceiling() -> None:
    lc = BackendLifecycle(ready_timeout_s=0.25)
    lc.feed(Launched(PID), 0.0)
    actions = lc.feed(TimerFired(), 0.25).actions
    assert SettleSpawn(SpawnFailure.READY_TIMEOUT, "not ready within 0.25 s") in actions


@pytest.mark.parametrize(
    "stop",
    [StopRequested(StopCause.REQUESTED), ForceKill(StopCause.BROKER_SHUTDOWN)],
    ids=["stop-requested", "force-kill"],
)
def test_stop_while_launching_kills_as_soon_as_launched(stop: StopRequested | ForceKill) -> None:
    lc = lifecycle()
    assert lc.feed(stop, 0.0) == Step(Phase.LAUNCHING)
    assert lc.starting
    assert lc.feed(Launched(PID), 0.1) == Step(
        Phase.STOPPING,
        (
            BeganStopping(stop.cause),
            Kill(),
            SettleSpawn(SpawnFailure.CANCELLED, "spawn cancelled"),
        ),
    )
    assert lc.pid == PID
    assert lc.deadline == INF
    assert lc.feed(ReadyReported(), 0.2) == Step(Phase.STOPPING)
    assert not lc.routable
    assert lc.feed(ProcessExited(-9), 0.3) == Step(
        Phase.EXITED,
        (
            Kill(),
            Ended(NeverReady(SpawnFailure.CANCELLED, "spawn cancelled before it started", -9)),
        ),
    )


def test_stop_while_launching_then_launch_failure_reports_the_launch_error() -> None:
    lc = lifecycle()
    lc.feed(StopRequested(StopCause.BROKER_SHUTDOWN), 0.0)
    assert lc.feed(LaunchFailed("cancelled"), 0.1) == Step(
        Phase.EXITED,
        (
            SettleSpawn(SpawnFailure.LAUNCH_ERROR, "cancelled"),
            Kill(),
            Ended(NeverReady(SpawnFailure.LAUNCH_ERROR, "cancelled", None)),
        ),
    )


def test_drain_deadline_terminates_then_grace_kills() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (QuiesceSent(10.0), 1.0)])
    assert lc.feed(TimerFired(), 10.0) == Step(
        Phase.STOPPING, (BeganStopping(StopCause.DRAIN_DEADLINE), Terminate())
    )
    assert lc.deadline == 10.0 + DEFAULT_TERMINATE_GRACE_S
    assert lc.feed(TimerFired(), 11.0) == Step(Phase.STOPPING, (Kill(),))
    assert lc.deadline == INF
    assert lc.feed(ProcessExited(-9), 11.1) == Step(
        Phase.EXITED, (Kill(), Ended(Stopped(-9, StopCause.DRAIN_DEADLINE)))
    )


def test_drain_deadline_terminated_backend_that_exits_in_grace_is_stopped() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (QuiesceSent(10.0), 1.0)])
    lc.feed(TimerFired(), 10.0)
    assert lc.feed(ProcessExited(-15), 10.5) == Step(
        Phase.EXITED, (Kill(), Ended(Stopped(-15, StopCause.DRAIN_DEADLINE)))
    )


def test_earlier_drain_deadline_wins() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (QuiesceSent(10.0), 1.0)])
    assert lc.feed(QuiesceSent(20.0), 2.0) == Step(Phase.DRAINING)
    assert lc.deadline == 10.0
    assert lc.feed(QuiesceSent(5.0), 3.0) == Step(Phase.DRAINING)
    assert lc.deadline == 5.0


def test_stop_requested_uses_its_grace_and_an_earlier_kill_time_wins() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1)])
    assert lc.feed(StopRequested(StopCause.REQUESTED, grace_s=3.0), 2.0) == Step(
        Phase.STOPPING, (BeganStopping(StopCause.REQUESTED), Terminate())
    )
    assert lc.deadline == 5.0
    assert lc.feed(StopRequested(StopCause.BROKER_SHUTDOWN, grace_s=10.0), 2.5) == Step(
        Phase.STOPPING
    )
    assert lc.deadline == 5.0  # a later kill time loses
    assert lc.feed(StopRequested(StopCause.BROKER_SHUTDOWN, grace_s=0.5), 3.0) == Step(
        Phase.STOPPING
    )
    assert lc.deadline == 3.5  # an earlier one wins
    assert lc.feed(TimerFired(), 3.5) == Step(Phase.STOPPING, (Kill(),))
    # The exit reports the first stop's cause.
    assert lc.feed(ProcessExited(-9), 3.6) == Step(
        Phase.EXITED, (Kill(), Ended(Stopped(-9, StopCause.REQUESTED)))
    )


def test_stop_requested_while_draining_uses_its_grace() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (QuiesceSent(30.0), 1.0)])
    assert lc.feed(StopRequested(StopCause.BROKER_SHUTDOWN, grace_s=0.5), 2.0) == Step(
        Phase.STOPPING, (BeganStopping(StopCause.BROKER_SHUTDOWN), Terminate())
    )
    assert lc.deadline == 2.5
    assert lc.feed(ProcessExited(0), 2.1) == Step(
        Phase.EXITED, (Kill(), Ended(Stopped(0, StopCause.BROKER_SHUTDOWN)))
    )


def test_stop_requested_then_exit_in_grace_is_stopped_with_its_cause() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1)])
    lc.feed(StopRequested(StopCause.BROKER_SHUTDOWN), 1.0)
    assert lc.deadline == 1.0 + DEFAULT_TERMINATE_GRACE_S
    assert lc.feed(LinkClosed(), 1.1) == Step(Phase.STOPPING)
    assert lc.feed(ProcessExited(0), 1.2) == Step(
        Phase.EXITED, (Kill(), Ended(Stopped(0, StopCause.BROKER_SHUTDOWN)))
    )


def test_stop_after_link_loss_still_reports_a_crash() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (LinkClosed(), 1.0)])
    lc.feed(StopRequested(StopCause.REQUESTED, grace_s=0.1), 1.05)
    assert lc.deadline == pytest.approx(1.15)
    assert lc.feed(ProcessExited(1), 1.1).actions[-1] == Ended(
        Crashed(1, link_lost_first=True, killed=False)
    )


def test_force_kill_after_link_loss_reports_a_killed_crash() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (LinkClosed(), 1.0)])
    assert lc.feed(ForceKill(), 1.1) == Step(Phase.STOPPING, (Kill(),))
    assert lc.feed(ProcessExited(-9), 1.2).actions[-1] == Ended(
        Crashed(-9, link_lost_first=True, killed=True)
    )


#: Inputs that reach each non-terminal phase, fed at t=0.
FORCE_KILL_PREFIXES = {
    Phase.STARTING: PREFIXES[Phase.STARTING],
    Phase.RUNNING: PREFIXES[Phase.RUNNING],
    Phase.DRAINING: PREFIXES[Phase.DRAINING],
    Phase.STOPPING: PREFIXES[Phase.STOPPING],
    # SIGTERM not yet answered after a link loss, too.
    "link-lost": (Launched(PID), ReadyReported(), LinkClosed()),
}


@pytest.mark.parametrize("where", list(FORCE_KILL_PREFIXES), ids=str)
def test_force_kill_anywhere_kills_now(where: Phase | str) -> None:
    lc = lifecycle()
    feed_all(lc, ((event, 0.0) for event in FORCE_KILL_PREFIXES[where]))
    step = lc.feed(ForceKill(), 0.5)
    assert step.phase is Phase.STOPPING
    assert count(step.actions, Kill) == 1
    assert lc.deadline == INF
    assert not lc.routable
    end = lc.feed(ProcessExited(-9), 0.6)
    assert end.phase is Phase.EXITED
    assert isinstance(end.actions[-1], Ended)


def test_force_kill_while_launching_kills_at_launch() -> None:
    lc = lifecycle()
    assert lc.feed(ForceKill(), 0.0) == Step(Phase.LAUNCHING)
    actions = lc.feed(Launched(PID), 0.1).actions
    assert Kill() in actions
    assert lc.deadline == INF


def test_force_kill_after_exit_does_nothing() -> None:
    lc = in_phase(Phase.EXITED)
    assert lc.feed(ForceKill(), 1.0) == Step(Phase.EXITED)


#: Whole lives, each ending in EXITED: (name, inputs with times).
LIVES: dict[str, list[tuple[Input, float]]] = {
    "launch-failed": [(LaunchFailed("boom"), 0.0)],
    "stopped-by-quiesce": [
        (Launched(PID), 0.0),
        (ReadyReported(), 0.1),
        (QuiesceSent(5.0), 1.0),
        (ProcessExited(0), 2.0),
    ],
    "crashed": [(Launched(PID), 0.0), (ReadyReported(), 0.1), (ProcessExited(1), 3.0)],
    "crashed-link-lost": [
        (Launched(PID), 0.0),
        (ReadyReported(), 0.1),
        (LinkClosed(), 3.0),
        (TimerFired(), 4.0),
        (ProcessExited(-9), 4.1),
    ],
    "exited-before-ready": [(Launched(PID), 0.0), (ProcessExited(1), 0.1)],
    "link-closed-before-ready": [
        (Launched(PID), 0.0),
        (LinkClosed(), 0.1),
        (ProcessExited(1), 0.2),
    ],
    "ready-timeout": [(Launched(PID), 0.0), (TimerFired(), 5.0), (ProcessExited(-9), 5.1)],
    "cancelled-while-launching": [
        (StopRequested(StopCause.REQUESTED), 0.0),
        (Launched(PID), 0.1),
        (ProcessExited(-9), 0.2),
    ],
    "cancelled-while-starting": [
        (Launched(PID), 0.0),
        (ForceKill(), 0.1),
        (ProcessExited(-9), 0.2),
    ],
    "drain-deadline": [
        (Launched(PID), 0.0),
        (ReadyReported(), 0.1),
        (QuiesceSent(5.0), 1.0),
        (TimerFired(), 5.0),
        (TimerFired(), 6.0),
        (ProcessExited(-9), 6.1),
    ],
    "stop-requested": [
        (Launched(PID), 0.0),
        (ReadyReported(), 0.1),
        (StopRequested(StopCause.REQUESTED), 1.0),
        (ProcessExited(0), 1.5),
    ],
}


@pytest.mark.parametrize("name", list(LIVES))
def test_every_life_settles_once_and_ends_once_last(name: str) -> None:
    lc = lifecycle()
    actions = feed_all(lc, LIVES[name])
    assert lc.exited
    assert count(actions, SettleSpawn) == 1
    assert count(actions, Ended) == 1
    assert isinstance(actions[-1], Ended)
    settle_at = next(i for i, a in enumerate(actions) if isinstance(a, SettleSpawn))
    assert settle_at < len(actions) - 1
    # Nothing after the end, whatever arrives.
    for event in REPRESENTATIVE.values():
        assert lc.feed(event, 100.0) == Step(Phase.EXITED)


# -- deaths reported out of order, stops after a kill ---------------------------------------


@pytest.mark.parametrize("gone", [LinkClosed(), ProcessExited(1)], ids=["link", "exit"])
def test_gone_before_launched_is_never_routable(gone: Input) -> None:
    lc = lifecycle()
    feed_all(lc, [(gone, 0.0), (Launched(PID), 0.1), (ReadyReported(), 0.2)])
    assert not lc.routable


def test_stop_after_kill_arms_no_timer() -> None:
    lc = lifecycle()
    feed_all(lc, [(Launched(PID), 0.0), (ReadyReported(), 0.1), (ForceKill(), 1.0)])
    assert lc.deadline == INF
    lc.feed(StopRequested(StopCause.REQUESTED), 1.5)
    assert lc.deadline == INF


# -- properties -------------------------------------------------------------------------


@attrs.frozen
class Fed:
    """One input as fed, and what the lifecycle looked like right after it."""

    event: Input
    now: float
    before: Phase
    step: Step
    routable: bool
    deadline: float


#: Drain deadlines and grace periods are drawn relative to the feed time.
@attrs.frozen
class QuiesceIn:
    after_s: float


inputs = st.one_of(
    st.builds(Launched, pid=st.integers(1, 99_999)),
    st.builds(LaunchFailed, detail=st.sampled_from(["boom", "no such file"])),
    st.just(ReadyReported()),
    st.just(LinkClosed()),
    st.builds(ProcessExited, status=st.integers(-15, 3)),
    st.builds(QuiesceIn, after_s=st.sampled_from([0.0, 0.5, 2.0, 10.0])),
    st.builds(
        StopRequested,
        cause=st.sampled_from(StopCause),
        grace_s=st.sampled_from([0.0, 0.5, 1.0, 5.0]),
    ),
    st.builds(ForceKill, cause=st.sampled_from(StopCause)),
    st.just(TimerFired()),
)
#: Lives usually get past the launch; bias some sequences to start from there.
starts = st.sampled_from(
    [(), (Launched(PID),), (Launched(PID), ReadyReported()), (Launched(PID), ReadyReported())]
)
steps_ms = st.integers(min_value=0, max_value=3_000)
sequences = st.tuples(starts, st.lists(st.tuples(inputs, steps_ms), max_size=30))


def run(sequence: tuple[tuple[Input, ...], list[tuple[Input | QuiesceIn, int]]]) -> list[Fed]:
    start, rest = sequence
    lc = lifecycle()
    now = 0.0
    fed: list[Fed] = []
    timeline: list[tuple[Input | QuiesceIn, int]] = [(event, 1) for event in start] + rest
    for raw, delta_ms in timeline:
        now += delta_ms / 1000
        event = QuiesceSent(now + raw.after_s) if isinstance(raw, QuiesceIn) else raw
        before = lc.phase
        step = lc.feed(event, now)
        assert step.phase is lc.phase
        fed.append(Fed(event, now, before, step, lc.routable, lc.deadline))
    return fed


def gone_after_launch(fed: Fed) -> bool:
    """A link loss or exit, fed at any time (one fed before the launch counts too)."""
    return isinstance(fed.event, LinkClosed | ProcessExited)


@settings(max_examples=400, deadline=None)
@given(sequence=sequences)
def test_property_unroutable_forever_once_gone(
    sequence: tuple[tuple[Input, ...], list[tuple[Input | QuiesceIn, int]]],
) -> None:
    gone = False
    for fed in run(sequence):
        gone = gone or gone_after_launch(fed)
        if gone:
            assert not fed.routable


@settings(max_examples=400, deadline=None)
@given(sequence=sequences)
def test_property_routable_only_running_ready_and_not_gone(
    sequence: tuple[tuple[Input, ...], list[tuple[Input | QuiesceIn, int]]],
) -> None:
    ready_fed = gone = False
    for fed in run(sequence):
        ready_fed = ready_fed or isinstance(fed.event, ReadyReported)
        gone = gone or gone_after_launch(fed)
        if fed.routable:
            assert fed.step.phase is Phase.RUNNING
            assert ready_fed
            assert not gone


@settings(max_examples=400, deadline=None)
@given(sequence=sequences)
def test_property_one_settle_one_end_and_silence_after(
    sequence: tuple[tuple[Input, ...], list[tuple[Input | QuiesceIn, int]]],
) -> None:
    settles = ends = 0
    killed = False
    for fed in run(sequence):
        if ends:
            assert fed.step == Step(Phase.EXITED)
            continue
        actions = fed.step.actions
        settles += count(actions, SettleSpawn)
        ends += count(actions, Ended)
        assert settles <= 1
        assert ends <= 1
        if ends:
            assert fed.step.phase is Phase.EXITED
            end = actions[-1]
            assert isinstance(end, Ended)
            assert settles == 1  # a life that ended has settled its spawn (Ended is last)
            if isinstance(end.outcome, Crashed):
                # "killed" exactly when the broker sent SIGKILL before the exit.
                assert end.outcome.killed == killed
        else:
            assert fed.step.phase is not Phase.EXITED
            killed = killed or Kill() in actions


@settings(max_examples=400, deadline=None)
@given(sequence=sequences)
def test_property_kill_at_the_latest_when_the_grace_ends(
    sequence: tuple[tuple[Input, ...], list[tuple[Input | QuiesceIn, int]]],
) -> None:
    killed = False
    for fed in run(sequence):
        if fed.before is not Phase.STOPPING:
            killed = False
        if fed.step.phase is Phase.STOPPING:
            killed = killed or any(isinstance(a, Kill) for a in fed.step.actions)
            if isinstance(fed.event, TimerFired) and fed.before is Phase.STOPPING:
                assert killed
            if not killed:
                # Not killed yet: a timer is always armed, so the kill cannot be missed.
                assert math.isfinite(fed.deadline)


@settings(max_examples=400, deadline=None)
@given(sequence=sequences)
def test_property_timer_exactly_where_documented(
    sequence: tuple[tuple[Input, ...], list[tuple[Input | QuiesceIn, int]]],
) -> None:
    killed = False
    for fed in run(sequence):
        phase = fed.step.phase
        if fed.before is not Phase.STOPPING:
            killed = False
        if phase is Phase.STOPPING and any(isinstance(a, Kill) for a in fed.step.actions):
            killed = True
        expected = phase in (Phase.STARTING, Phase.DRAINING) or (
            phase is Phase.STOPPING and not killed
        )
        assert math.isfinite(fed.deadline) == expected


def test_a_ready_timeout_names_the_last_failed_readiness_check() -> None:
    lc = lifecycle()
    feed_all(
        lc,
        [
            (Launched(PID), 0.0),
            (ReadinessCheckFailed("unreachable: connection refused"), 1.0),
            (ReadinessCheckFailed("bad-reply: not a probe reply"), 2.0),
        ],
    )
    assert lc.phase is Phase.STARTING and lc.deadline == READY_TIMEOUT_S
    actions = lc.feed(TimerFired(), READY_TIMEOUT_S).actions
    detail = "not ready within 5 s (last readiness check: bad-reply: not a probe reply)"
    assert SettleSpawn(SpawnFailure.READY_TIMEOUT, detail) in actions
    step = lc.feed(ProcessExited(-9), READY_TIMEOUT_S + 0.1)
    assert Ended(NeverReady(SpawnFailure.READY_TIMEOUT, detail, -9)) in step.actions
