"""Property-based tests of the policy core (hypothesis).

- an ACK-registry entry leaves exactly once, whatever the operation sequence
  (model-based state machine);
- a token is ACCEPTED at most once, whatever the operation sequence;
- the service-name and semver validators accept exactly their languages;
- the idle tracker's lazy heap agrees with a brute-force model;
- the rate limiter, fallback state and spawn budget agree with simple models.
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
from rpbroker.policy.fallback import Fallback, FallbackPolicy, FallbackState, HandoffInputs
from rpbroker.policy.hello import HelloRateLimiter, is_valid_semver, is_valid_service_name
from rpbroker.policy.idle import BackendLifecycle, IdleTracker
from rpbroker.policy.spawn_budget import (
    SPAWN_IN_PROGRESS,
    BudgetExhausted,
    SpawnBudget,
    SpawnOutcome,
    SpawnPermit,
)
from rpbroker.policy.tokens import HandoffToken, TokenStore, TokenVerdict

# Times are whole milliseconds expressed in seconds, so arithmetic stays exact enough
# for model comparisons (the model uses the same float operations).
step_s = st.integers(min_value=0, max_value=3_000).map(lambda ms: ms / 1000)


# -- ACK registry: exactly-once exit -------------------------------------------------------


@dataclass
class Registration:
    token: HandoffToken
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
        self.revoked: set[HandoffToken] = set()

    def _exit(self, token: HandoffToken, revokes: bool = True) -> None:
        registration = self.live.pop(token)
        registration.exits += 1
        if revokes:
            self.revoked.add(token)

    @rule(target=tokens, deadline=st.none() | st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    def issue_and_register(self, deadline: float | None) -> HandoffToken:
        token = self.store.issue(self.now)
        deadline_at = self.registry.register(token, BackendRef("svc", 1), self.now, deadline)
        registration = Registration(token, deadline_at)
        self.live[token] = registration
        self.all.append(registration)
        return token

    @rule(token=tokens)
    def reregister(self, token: HandoffToken) -> None:
        if token in self.live:
            # The replaced registration is superseded; count that as its exit.
            self._exit(token, revokes=False)
        deadline_at = self.registry.register(token, BackendRef("svc", 2), self.now)
        registration = Registration(token, deadline_at)
        self.live[token] = registration
        self.all.append(registration)

    @rule(token=tokens)
    def acknowledge(self, token: HandoffToken) -> None:
        outcome = self.registry.acknowledge(token, self.now)
        registration = self.live.get(token)
        if registration is None:
            assert outcome == AckRejected(AckRejection.NOT_PENDING)
            return
        if self.now >= registration.deadline_at:
            assert isinstance(outcome, AckRejected)
            assert outcome.reason is AckRejection.DEADLINE_EXCEEDED
        else:
            assert isinstance(outcome, AckCompleted)
        self._exit(token)

    @rule(token=tokens)
    def abandon(self, token: HandoffToken) -> None:
        existed = self.registry.abandon(token)
        assert existed == (token in self.live)
        if existed:
            self._exit(token)
        self.revoked.add(token)

    @rule()
    def expire(self) -> None:
        expired = self.registry.expire_overdue(self.now)
        expected = {t for t, r in self.live.items() if r.deadline_at <= self.now}
        assert {e.token for e in expired} == expected
        assert len(expired) == len(expected)
        deadlines = [self.live[e.token].deadline_at for e in expired]
        assert deadlines == sorted(deadlines)
        for e in expired:
            self._exit(e.token)

    @rule(delta=step_s)
    def advance(self, delta: float) -> None:
        self.now += delta

    @invariant()
    def registry_matches_model(self) -> None:
        assert len(self.registry) == len(self.live)
        for token, registration in self.live.items():
            assert token in self.registry
            assert self.registry.deadline_of(token) == registration.deadline_at
            # Registration does not touch the store: a token is pending until revoked.
            assert self.store.is_pending(token, self.now) == (token not in self.revoked)
        for token in self.revoked:
            assert not self.store.is_pending(token, self.now)
        expected_next = min((r.deadline_at for r in self.live.values()), default=None)
        assert self.registry.next_deadline() == expected_next

    @invariant()
    def exits_at_most_once(self) -> None:
        assert all(r.exits <= 1 for r in self.all)

    def teardown(self) -> None:
        for e in self.registry.expire_overdue(float("inf")):
            self._exit(e.token)
        assert len(self.registry) == 0
        assert all(r.exits == 1 for r in self.all)


AckRegistryMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestAckRegistryExactlyOnce = AckRegistryMachine.TestCase


# -- tokens: ACCEPTED at most once ---------------------------------------------------------


class TokenStoreMachine(RuleBasedStateMachine):
    """Whatever happens, each issued token is ACCEPTED at most once."""

    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.store = TokenStore(max_pending=8, ttl_s=2.0)
        self.accepted: dict[HandoffToken, int] = {}
        # Model: token -> expires_at, for tokens not consumed or revoked.
        self.model: dict[HandoffToken, float] = {}

    def _note(self, token: HandoffToken, verdict: TokenVerdict) -> None:
        if verdict is TokenVerdict.ACCEPTED:
            self.accepted[token] = self.accepted.get(token, 0) + 1

    def _prune(self, keep: HandoffToken | None = None) -> None:
        self.model = {t: e for t, e in self.model.items() if self.now < e or t == keep}

    def _live_count(self) -> int:
        return sum(1 for e in self.model.values() if self.now < e)

    @precondition(lambda self: self._live_count() < 8)
    @rule(target=tokens)
    def issue(self) -> HandoffToken:
        token = self.store.issue(self.now)
        self._prune()
        self.model[token] = self.now + 2.0
        return token

    @rule(expected=tokens, presented=tokens)
    def consume_matching(self, expected: HandoffToken, presented: HandoffToken) -> None:
        verdict = self.store.consume_matching(expected, presented, self.now)
        self._note(expected, verdict)
        self._prune(keep=expected)
        expires = self.model.get(expected)
        if expires is None:
            assert verdict is TokenVerdict.NOT_PENDING
        elif self.now >= expires:
            assert verdict is TokenVerdict.EXPIRED
            del self.model[expected]
        elif presented != expected:
            assert verdict is TokenVerdict.MISMATCH
        else:
            assert verdict is TokenVerdict.ACCEPTED
            del self.model[expected]

    @rule(expected=tokens, garbage=st.binary(max_size=40).filter(lambda b: len(b) != 16))
    def consume_malformed(self, expected: HandoffToken, garbage: bytes) -> None:
        verdict = self.store.consume_matching(expected, garbage, self.now)
        assert verdict in (TokenVerdict.MISSING, TokenVerdict.BAD_LENGTH)
        assert self.store.is_pending(expected, self.now) == (
            expected in self.model and self.now < self.model[expected]
        )

    @rule(token=tokens, as_bytes=st.booleans())
    def consume_backend(self, token: HandoffToken, as_bytes: bool) -> None:
        verdict = self.store.consume(token.raw if as_bytes else token, self.now)
        self._note(token, verdict)
        expires = self.model.pop(token, None)
        self._prune()
        if expires is None:
            assert verdict is TokenVerdict.NOT_PENDING
        elif self.now >= expires:
            assert verdict is TokenVerdict.EXPIRED
        else:
            assert verdict is TokenVerdict.ACCEPTED

    @rule(token=consumes(tokens))
    def revoke(self, token: HandoffToken) -> None:
        held = self.store.revoke(token)
        # Expired-but-unpruned tokens are still held, exactly as in the model.
        assert held == (self.model.pop(token, None) is not None)

    @rule(delta=step_s)
    def advance(self, delta: float) -> None:
        self.now += delta

    @rule()
    def prune(self) -> None:
        before = len(self.model)
        self._prune()
        assert self.store.prune_expired(self.now) == before - len(self.model)

    @invariant()
    def store_matches_model(self) -> None:
        assert self.store.pending_count == len(self.model)
        for token, expires in self.model.items():
            assert self.store.expires_at(token) == expires

    @invariant()
    def at_most_once(self) -> None:
        assert all(count <= 1 for count in self.accepted.values())


TokenStoreMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestTokenAcceptedAtMostOnce = TokenStoreMachine.TestCase


@dataclass
class TokenOp:
    kind: str
    a: int = 0
    b: int = 0
    delta: float = 0.0


token_ops = st.lists(
    st.one_of(
        st.builds(TokenOp, kind=st.just("issue")),
        st.builds(TokenOp, kind=st.just("match"), a=st.integers(0, 9), b=st.integers(0, 9)),
        st.builds(TokenOp, kind=st.just("consume"), a=st.integers(0, 9)),
        st.builds(TokenOp, kind=st.just("revoke"), a=st.integers(0, 9)),
        st.builds(TokenOp, kind=st.just("insert"), a=st.integers(0, 9)),
        st.builds(TokenOp, kind=st.just("advance"), delta=step_s),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=token_ops)
def test_token_accepted_at_most_once_between_inserts(ops: list[TokenOp]) -> None:
    """A generated op list, re-seeding included: between two holds of a token,
    it is ACCEPTED at most once."""
    store = TokenStore(max_pending=4, ttl_s=1.0)
    issued: list[HandoffToken] = []
    accepts_since_hold: dict[HandoffToken, int] = {}
    now = 0.0
    for op in ops:
        if op.kind == "advance":
            now += op.delta
            continue
        if op.kind == "issue":
            try:
                token = store.issue(now)
            except Exception:
                continue
            issued.append(token)
            accepts_since_hold[token] = 0
            continue
        if not issued:
            continue
        first = issued[op.a % len(issued)]
        if op.kind == "insert":
            try:
                store.insert(first, now)
            except Exception:
                continue
            accepts_since_hold[first] = 0
        elif op.kind == "revoke":
            store.revoke(first)
        elif op.kind == "consume":
            if store.consume(first, now) is TokenVerdict.ACCEPTED:
                accepts_since_hold[first] += 1
        else:
            second = issued[op.b % len(issued)]
            if store.consume_matching(first, second, now) is TokenVerdict.ACCEPTED:
                assert first == second
                accepts_since_hold[first] += 1
        assert all(n <= 1 for n in accepts_since_hold.values())


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
    state: BackendLifecycle


idle_ops = st.lists(
    st.tuples(
        st.sampled_from(["activity", "activity_t", "drain", "quiesce", "remove", "collect"]),
        st.integers(0, 4),
        st.sampled_from([0.5, 1.0, 2.0, 3.0]),
        step_s,
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=idle_ops)
def test_idle_tracker_matches_model(ops: list[tuple[str, int, float, float]]) -> None:
    tracker = IdleTracker(default_timeout_s=1.5)
    model: dict[int, IdleModelEntry] = {}
    now = 0.0
    for kind, key, timeout, delta in ops:
        now += delta
        if kind == "activity":
            tracker.mark_activity(key, now)
            previous = model.get(key)
            model[key] = IdleModelEntry(
                now, previous.timeout if previous else 1.5, BackendLifecycle.RUNNING
            )
        elif kind == "activity_t":
            tracker.mark_activity(key, now, timeout_s=timeout)
            model[key] = IdleModelEntry(now, timeout, BackendLifecycle.RUNNING)
        elif kind in ("drain", "quiesce"):
            state = BackendLifecycle.DRAINING if kind == "drain" else BackendLifecycle.QUIESCED
            changed = tracker.mark_draining(key) if kind == "drain" else tracker.mark_quiesced(key)
            assert changed == (key in model)
            if key in model:
                model[key].state = state
        elif kind == "remove":
            assert tracker.remove(key) == (model.pop(key, None) is not None)
        else:
            due = tracker.collect_due(now)
            expected = {
                k
                for k, e in model.items()
                if e.state is BackendLifecycle.RUNNING and e.last + e.timeout <= now
            }
            assert len(due) == len(expected)
            assert {d.key for d in due} == expected
            by_key: dict[Hashable, IdleModelEntry] = {k: e for k, e in model.items()}
            for d in due:
                assert d.idle_for_s == now - by_key[d.key].last
                assert d.timeout_s == by_key[d.key].timeout
            due_times = [by_key[d.key].last + by_key[d.key].timeout for d in due]
            assert due_times == sorted(due_times)
            for k in expected:
                model[k].state = BackendLifecycle.DRAINING
        running = [
            e.last + e.timeout for e in model.values() if e.state is BackendLifecycle.RUNNING
        ]
        assert tracker.next_due_at() == (min(running) if running else None)
        for k, e in model.items():
            assert tracker.state(k) is e.state
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


# -- fallback state: retry-after bounded, counts capped --------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.booleans(), st.integers(0, 2), step_s), max_size=60),
    max_failed=st.integers(1, 4),
)
def test_fallback_counts_capped_and_retry_after_within_window(
    events: list[tuple[bool, int, float]], max_failed: int
) -> None:
    state = FallbackState(FallbackPolicy(max_failed, 2.0))
    now = 0.0
    for fail, key, delta in events:
        now += delta
        if fail:
            assert 1 <= state.record_failure(key, now) <= max_failed
        decision = state.should_attempt(key, HandoffInputs.enabled(), now)
        count = state.failed_count(key, now)
        assert 0 <= count <= max_failed
        if isinstance(decision, Fallback):
            assert count == max_failed
            assert decision.retry_after_s is not None
            assert 0.0 < decision.retry_after_s <= 2.0
        else:
            assert count < max_failed


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
    budget = SpawnBudget(max_attempts, 5.0)
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
        outcome: BroadcastOutcome
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
