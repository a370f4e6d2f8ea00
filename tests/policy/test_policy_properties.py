"""Property-based tests of the policy core (hypothesis).

- an ACK-registry entry leaves exactly once, whatever the operation sequence
  (model-based state machine), and revokes its token when it does;
- the token store agrees with a model (held tokens, expiry at issue, capacity);
- the service-name and semver validators accept exactly their languages;
- the idle tracker's lazy heap agrees with a brute-force model (a backend is
  handed out once, and stops being tracked then);
- the rate limiter, fallback state (attempts in flight included), spawn budget,
  spawn limiter and broadcast collector agree with simple models.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from rpbroker.policy.ack import AckCompleted, AckRegistry, AckRejected, AckRejection, BackendRef
from rpbroker.policy.broadcast import (
    BackendAcked,
    BackendFailed,
    BackendSkippedDead,
    BackendTimedOut,
    BroadcastCollector,
    BroadcastFailure,
    BroadcastOutcome,
    ReleaseHandles,
)
from rpbroker.policy.fallback import (
    Attempt,
    AttemptResult,
    Fallback,
    FallbackPolicy,
    FallbackReason,
    FallbackState,
    HandoffInputs,
)
from rpbroker.policy.hello import HelloRateLimiter, is_valid_semver, is_valid_service_name
from rpbroker.policy.idle import IdleTracker
from rpbroker.policy.spawn_budget import (
    SPAWN_IN_PROGRESS,
    BudgetExhausted,
    SpawnBudget,
    SpawnLimiter,
    SpawnOutcome,
    SpawnPermit,
)
from rpbroker.policy.tokens import HandoffToken, TokenStore, TokenStoreFull

# Times are whole milliseconds expressed in seconds, so arithmetic stays exact enough
# for model comparisons (the model uses the same float operations).
step_s = st.integers(min_value=0, max_value=3_000).map(lambda ms: ms / 1000)


# -- ACK registry: exactly-once exit -------------------------------------------------------


@dataclass
class Registration:
    token: HandoffToken
    backend: BackendRef
    registered_at: float
    deadline_at: float
    exits: int = 0


class AckRegistryMachine(RuleBasedStateMachine):
    """Every registration leaves the registry exactly once (or is superseded)."""

    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.store = TokenStore(max_pending=100_000, ttl_s=1e9)
        self.registry = AckRegistry(self.store, deadline_s=1.0)
        self.live: dict[HandoffToken, Registration] = {}
        self.all: list[Registration] = []
        self.issued: set[HandoffToken] = set()
        self.revoked: set[HandoffToken] = set()
        self.pid = 0

    def _exit(self, token: HandoffToken, revokes: bool = True) -> None:
        registration = self.live.pop(token)
        registration.exits += 1
        if revokes:
            self.revoked.add(token)

    def _register(self, token: HandoffToken) -> None:
        self.pid += 1
        backend = BackendRef("svc", self.pid)
        deadline_at = self.registry.register(token, backend, self.now)
        assert deadline_at == self.now + 1.0
        registration = Registration(token, backend, self.now, deadline_at)
        self.live[token] = registration
        self.all.append(registration)

    @rule(target=tokens)
    def issue_and_register(self) -> HandoffToken:
        token = self.store.issue(self.now)
        self.issued.add(token)
        self._register(token)
        return token

    @rule(target=tokens)
    def issue_only(self) -> HandoffToken:
        token = self.store.issue(self.now)
        self.issued.add(token)
        return token

    @rule(token=tokens)
    def reregister(self, token: HandoffToken) -> None:
        if token in self.live:
            # The replaced registration is superseded; count that as its exit.
            self._exit(token, revokes=False)
        self._register(token)

    @rule(token=tokens)
    def acknowledge(self, token: HandoffToken) -> None:
        outcome = self.registry.acknowledge(token, self.now)
        registration = self.live.get(token)
        if registration is None:
            assert outcome == AckRejected(AckRejection.NOT_PENDING)
            return
        if self.now >= registration.deadline_at:
            assert outcome == AckRejected(AckRejection.DEADLINE_EXCEEDED, registration.backend, 1.0)
        else:
            assert outcome == AckCompleted(
                token, registration.backend, self.now - registration.registered_at
            )
        self._exit(token)

    @rule(token=tokens)
    def abandon(self, token: HandoffToken) -> None:
        existed = self.registry.abandon(token)
        assert existed == (token in self.live)
        if existed:
            self._exit(token)
        self.revoked.add(token)

    @rule(delta=step_s)
    def advance(self, delta: float) -> None:
        self.now += delta

    @invariant()
    def registry_matches_model(self) -> None:
        assert len(self.registry) == len(self.live)
        # Registration does not touch the store; every exit (and abandon) revokes.
        assert len(self.store) == len(self.issued - self.revoked)

    @invariant()
    def exits_at_most_once(self) -> None:
        assert all(r.exits <= 1 for r in self.all)

    def teardown(self) -> None:
        for token in list(self.live):
            assert self.registry.abandon(token)
            self._exit(token)
        assert len(self.registry) == 0
        assert all(r.exits == 1 for r in self.all)


AckRegistryMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestAckRegistryExactlyOnce = AckRegistryMachine.TestCase


# -- tokens: the store agrees with a model -------------------------------------------------


class TokenStoreMachine(RuleBasedStateMachine):
    """Held tokens, expiry at issue time and capacity, exactly as in a model."""

    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.store = TokenStore(max_pending=8, ttl_s=2.0)
        # Model: token -> expires_at, for tokens held (expired ones until pruned).
        self.model: dict[HandoffToken, float] = {}
        self.ever_issued: set[HandoffToken] = set()

    def _prune(self) -> None:
        # Issuing prunes what expired (a token expires at issued + ttl), then
        # checks capacity.
        self.model = {t: e for t, e in self.model.items() if self.now < e}

    def _live_count(self) -> int:
        return sum(1 for e in self.model.values() if self.now < e)

    @precondition(lambda self: self._live_count() < 8)
    @rule(target=tokens)
    def issue(self) -> HandoffToken:
        token = self.store.issue(self.now)
        self._prune()
        assert token not in self.model
        assert token not in self.ever_issued  # 128 random bits never repeat here
        self.ever_issued.add(token)
        self.model[token] = self.now + 2.0
        return token

    @precondition(lambda self: self._live_count() >= 8)
    @rule()
    def issue_when_full(self) -> None:
        try:
            self.store.issue(self.now)
        except TokenStoreFull as exc:
            assert exc.max_pending == 8
        else:
            raise AssertionError("a token was issued past capacity")
        self._prune()

    @rule(token=consumes(tokens))
    def revoke(self, token: HandoffToken) -> None:
        held = self.store.revoke(token)
        # Expired-but-unpruned tokens are still held, exactly as in the model.
        assert held == (self.model.pop(token, None) is not None)

    @rule(delta=step_s)
    def advance(self, delta: float) -> None:
        self.now += delta

    @invariant()
    def store_matches_model(self) -> None:
        assert len(self.store) == len(self.model)


TokenStoreMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestTokenStoreMatchesModel = TokenStoreMachine.TestCase


# -- validators accept exactly their languages ---------------------------------------------

SERVICE_RE = re.compile(r"[a-z0-9-]{1,64}")
SEMVER_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(-[a-z0-9.]+)?")

# ASCII letters, digits and punctuation near the languages' edges, whitespace and
# control characters, and non-ASCII look-alikes (accented letters, non-ASCII
# digits, dotless i, Kelvin sign, emoji).
ALPHABET = st.sampled_from(
    [
        *"abcxyz0189-.ABCZ_+/ \t\n\r\x00",
        *"\u00e9\u00df\u20ac\u0661\uff11\u00a0\u2028\U0001f600\u0131\u212a",
    ]
)
messy_text = st.text(alphabet=ALPHABET, max_size=80)


def _service_oracle(s: str) -> bool:
    return SERVICE_RE.fullmatch(s) is not None and len(s.encode("utf-8", "surrogatepass")) <= 64


def _semver_oracle(s: str) -> bool:
    return SEMVER_RE.fullmatch(s) is not None and len(s.encode("utf-8", "surrogatepass")) <= 64


near_semver = st.builds(
    lambda parts, tail, suffix: ".".join(parts) + tail + suffix,
    st.lists(st.text(alphabet="0123456789a", max_size=3), min_size=1, max_size=4),
    st.one_of(st.just(""), st.text(alphabet="-abz09.A+_", max_size=70).map(lambda t: "-" + t)),
    st.sampled_from(["", "", "", "\n", " ", "+b", "-", "é"]),
)


@settings(max_examples=600, deadline=None)
@given(
    s=st.one_of(
        messy_text,
        st.from_regex(SERVICE_RE, fullmatch=True),
        st.text(alphabet="abz09-", min_size=60, max_size=70),
    )
)
def test_service_name_validator_accepts_exactly_its_language(s: str) -> None:
    assert is_valid_service_name(s) == _service_oracle(s)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(s=st.one_of(messy_text, st.from_regex(SEMVER_RE, fullmatch=True), near_semver))
def test_semver_validator_accepts_exactly_its_language(s: str) -> None:
    assert is_valid_semver(s) == _semver_oracle(s)


@given(s=st.from_regex(SEMVER_RE, fullmatch=True))
@settings(deadline=None)
def test_trailing_newline_never_accepted(s: str) -> None:
    assert not is_valid_semver(s + "\n")
    assert not is_valid_service_name("svc\n")


# -- idle tracker agrees with a brute-force model ------------------------------------------


@dataclass
class IdleModelEntry:
    last: float
    timeout: float


idle_ops = st.lists(
    st.tuples(
        st.sampled_from(["activity", "activity_t", "remove", "collect"]),
        st.integers(0, 4),
        st.sampled_from([0.5, 1.0, 2.0, 3.0, 30.0]),
        step_s,
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=idle_ops)
def test_idle_tracker_matches_model(ops: list[tuple[str, int, float, float]]) -> None:
    tracker = IdleTracker[int]()
    model: dict[int, IdleModelEntry] = {}
    now = 0.0
    for kind, key, timeout, delta in ops:
        now += delta
        if kind == "activity":
            # No timeout given: the default (30 s), whatever the backend had before.
            tracker.mark_activity(key, now)
            model[key] = IdleModelEntry(now, 30.0)
        elif kind == "activity_t":
            tracker.mark_activity(key, now, timeout_s=timeout)
            model[key] = IdleModelEntry(now, timeout)
        elif kind == "remove":
            assert tracker.remove(key) == (model.pop(key, None) is not None)
        else:
            due = tracker.collect_due(now)
            expected = {k for k, e in model.items() if e.last + e.timeout <= now}
            assert len(due) == len(expected)
            assert {d.key for d in due} == expected
            for d in due:
                assert d.idle_for_s == now - model[d.key].last
                assert d.timeout_s == model[d.key].timeout
            due_times = [model[d.key].last + model[d.key].timeout for d in due]
            assert due_times == sorted(due_times)
            # Handed out once: it is no longer tracked.
            for k in expected:
                del model[k]
        due_at = [e.last + e.timeout for e in model.values()]
        assert tracker.next_due_at() == (min(due_at) if due_at else None)
        for k in range(5):
            assert (k in tracker) == (k in model)
        assert len(tracker) == len(model)


# -- rate limiter agrees with a model ------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 3), step_s), max_size=80),
    limit=st.integers(1, 4),
)
def test_rate_limiter_matches_model(events: list[tuple[int, float]], limit: int) -> None:
    limiter = HelloRateLimiter(max_per_window=limit, window_s=1.0)
    windows: dict[int, list[float]] = {}  # pid -> [started_at, count]
    now = 0.0
    for pid, delta in events:
        now += delta / 3
        refusal = limiter.check(pid, now)
        if pid == 0:
            assert refusal is None
            continue
        window = windows.get(pid)
        if window is None or now - window[0] >= 1.0:
            windows[pid] = [now, 1]
            assert refusal is None
        elif window[1] < limit:
            window[1] += 1
            assert refusal is None
        else:
            assert refusal is not None
            assert refusal.retry_after_ms is not None
            assert 1 <= refusal.retry_after_ms <= 1000


# -- fallback state agrees with a model, and the budget is never overrun -------------------

ENABLED = HandoffInputs(client_opted_in=True, service_allows=True, fd_pressure=False)
FALLBACK_WINDOW_S = 2.0


@dataclass
class FallbackModelEntry:
    window_started_at: float | None = None
    failures: int = 0
    in_flight: int = 0
    #: Attempts started (permitted) while the current failure window was open,
    #: and attempts abandoned in it: the budget rule bounds their difference.
    started_in_window: int = 0
    abandoned_in_window: int = 0

    def roll(self, now: float) -> None:
        if self.window_started_at is not None and now - self.window_started_at >= 2.0:
            self.reset()

    def reset(self) -> None:
        self.window_started_at = None
        self.failures = 0
        self.started_in_window = 0
        self.abandoned_in_window = 0


fallback_events = st.lists(
    st.tuples(
        st.sampled_from(["start", "start", "succeed", "fail", "fail", "abandon"]),
        st.integers(0, 2),
        step_s,
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(events=fallback_events, max_failed=st.integers(1, 4))
def test_fallback_state_matches_model(
    events: list[tuple[str, int, float]], max_failed: int
) -> None:
    """``should_attempt`` agrees with the documented rule exactly.

    Attempts start only when permitted (as the shell does); results arrive for
    attempts in flight. Once a backend has a failure in its window, attempts in
    flight count as potential failures; ABANDONED counts neither way.
    """
    state = FallbackState[int](FallbackPolicy(max_failed, FALLBACK_WINDOW_S))
    model = {key: FallbackModelEntry() for key in range(3)}
    now = 0.0
    for kind, key, delta in events:
        now += delta
        entry = model[key]
        if kind == "start":
            entry.roll(now)
            decision = state.should_attempt(key, ENABLED, now)
            if entry.window_started_at is None or entry.failures + entry.in_flight < max_failed:
                assert decision == Attempt()
                state.attempt_started(key)
                entry.in_flight += 1
                if entry.window_started_at is not None:
                    entry.started_in_window += 1
            else:
                elapsed = max(0.0, now - entry.window_started_at)
                assert decision == Fallback(
                    FallbackReason.FAILED_ATTEMPT_RATE_LIMITED,
                    retry_after_s=max(0.0, FALLBACK_WINDOW_S - elapsed),
                )
                assert isinstance(decision, Fallback) and decision.retry_after_s is not None
                assert 0.0 < decision.retry_after_s <= FALLBACK_WINDOW_S
            continue
        if entry.in_flight == 0:
            continue  # results only for attempts in flight
        result = {
            "succeed": AttemptResult.SUCCEEDED,
            "fail": AttemptResult.FAILED,
            "abandon": AttemptResult.ABANDONED,
        }[kind]
        state.attempt_ended(key, result, now)
        entry.roll(now)
        entry.in_flight -= 1
        if result is AttemptResult.FAILED:
            if entry.window_started_at is None:
                entry.window_started_at = now
            entry.failures = min(entry.failures + 1, max_failed)
        elif result is AttemptResult.SUCCEEDED:
            entry.reset()
        elif entry.window_started_at is not None:
            entry.abandoned_in_window += 1
        # The budget is never overrun: after the first failure of a window at most
        # max_failed - 1 more attempts may start and fail (plus one per abandoned).
        assert entry.started_in_window <= max_failed - 1 + entry.abandoned_in_window
        # Tracked: everything with an attempt in flight (run-out windows may linger).
        tracked_at_least = sum(1 for e in model.values() if e.in_flight)
        assert tracked_at_least <= len(state) <= 3


# -- spawn budget: never more than max permits per window, one in flight ----------------------


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["begin", "ok", "fail"]), st.integers(0, 1), step_s),
        max_size=60,
    ),
    max_attempts=st.integers(1, 3),
)
def test_spawn_budget_bounds(events: list[tuple[str, int, float]], max_attempts: int) -> None:
    budget = SpawnBudget[int](max_attempts, 5.0)
    now = 0.0
    for kind, key, delta in events:
        now += delta
        if kind == "begin":
            decision = budget.try_begin(key, now)
            if isinstance(decision, SpawnPermit):
                assert 1 <= decision.attempt_number <= max_attempts
                assert decision.remaining == max_attempts - decision.attempt_number
                assert budget.try_begin(key, now) is SPAWN_IN_PROGRESS
            elif isinstance(decision, BudgetExhausted):
                assert 0.0 < decision.retry_after_s <= 5.0
        else:
            outcome = SpawnOutcome.SUCCEEDED if kind == "ok" else SpawnOutcome.FAILED
            budget.finish(key, outcome, now)
            assert not budget.snapshot(key, now).in_flight
        snap = budget.snapshot(key, now)
        assert 0 <= snap.attempts_used <= max_attempts
        assert snap.remaining == max_attempts - snap.attempts_used
        assert (snap.retry_after_s is not None) == (snap.remaining == 0)


# -- spawn limiter: per-key and per-service bounds, refusals spend nothing -----------------


@dataclass
class WindowModel:
    started_at: float
    used: int = 0


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["begin", "begin", "ok", "fail"]),
            st.integers(0, 3),
            step_s,
        ),
        max_size=80,
    ),
    max_attempts=st.integers(1, 3),
    max_service=st.integers(1, 5),
)
def test_spawn_limiter_matches_model(
    events: list[tuple[str, int, float]], max_attempts: int, max_service: int
) -> None:
    """Keys 0-1 belong to service "a", keys 2-3 to "b"; every spawn is within both budgets."""
    window_s = 5.0
    limiter = SpawnLimiter[int, str](max_attempts, window_s, max_service)
    keys: dict[Hashable, WindowModel] = {}
    services: dict[Hashable, WindowModel] = {}
    in_flight: set[int] = set()
    now = 0.0

    def current(windows: dict[Hashable, WindowModel], name: Hashable) -> WindowModel | None:
        window = windows.get(name)
        if window is None or now - window.started_at >= window_s:
            return None
        return window

    for kind, key, delta in events:
        now += delta
        service = "a" if key < 2 else "b"
        if kind == "begin":
            decision = limiter.try_begin(key, service, now)
            cap = current(services, service)
            own = current(keys, key)
            if cap is not None and cap.used >= max_service:
                assert isinstance(decision, BudgetExhausted)
            elif key in in_flight and own is not None:
                assert decision is SPAWN_IN_PROGRESS
            elif own is not None and own.used >= max_attempts:
                assert isinstance(decision, BudgetExhausted)
            else:
                assert isinstance(decision, SpawnPermit)
                if own is None:
                    own = keys[key] = WindowModel(now)
                if cap is None:
                    cap = services[service] = WindowModel(now)
                own.used += 1
                cap.used += 1
                in_flight.add(key)
                assert own.used <= max_attempts
                assert cap.used <= max_service
            continue
        if key not in in_flight:
            continue  # results only for spawns in flight
        outcome = SpawnOutcome.SUCCEEDED if kind == "ok" else SpawnOutcome.FAILED
        limiter.finish(key, service, outcome, now)
        in_flight.discard(key)
        if current(keys, key) is None:
            keys[key] = WindowModel(now)  # finishing after the window ran out rolls it over
        if outcome is SpawnOutcome.SUCCEEDED:
            keys[key] = WindowModel(now)
            if service in services:
                services[service] = WindowModel(now)
        snapshot = limiter.keys.snapshot(key, now)
        own = current(keys, key)
        assert snapshot.attempts_used == (0 if own is None else own.used)


# -- broadcast collector: every target accounted for exactly once ----------------------------


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 12),
    arrivals=st.lists(
        st.tuples(st.integers(0, 11), st.sampled_from(["ack", "timeout", "fail", "dead"])),
        max_size=30,
    ),
)
def test_collector_accounts_for_every_backend_once(n: int, arrivals: list[tuple[int, str]]) -> None:
    backends = [f"b{i}" for i in range(n)]
    collector = BroadcastCollector(ReleaseHandles("/"), backends)
    first: dict[str, str] = {}
    for index, kind in arrivals:
        if index >= n:
            continue
        name = backends[index]
        outcome: BroadcastOutcome[str]
        if kind == "ack":
            outcome = BackendAcked(name)
        elif kind == "timeout":
            outcome = BackendTimedOut(name, 1.0)
        elif kind == "fail":
            outcome = BackendFailed(name, BroadcastFailure.REJECTED)
        else:
            outcome = BackendSkippedDead(name)
        assert collector.record(outcome) == (name not in first)
        first.setdefault(name, kind)
    result = collector.result()
    assert result.sent_count + len(result.skipped_dead) == n
    seen: list[Hashable] = [o.backend for o in result.acks]
    seen += [o.backend for o in result.timeouts]
    seen += [o.backend for o in result.failures]
    seen += [o.backend for o in result.skipped_dead]
    assert sorted(map(str, seen)) == sorted(backends)
    assert [a.backend for a in result.acks] == [b for b in backends if first.get(b) == "ack"]
    assert result.all_live_backends_acked == all(first.get(b) in ("ack", "dead") for b in backends)
