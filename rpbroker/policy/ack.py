"""Pending-ACK registry: a handoff completes only if its backend ACKs in time.

What this module does: tracks every issued handoff token that still awaits the
backend's acknowledgement, with an absolute deadline (5 s after registration by
default). Each entry leaves the registry exactly once, by one of:
acknowledgement in time (completed), a late acknowledgement (rejected),
abandonment, or expiry. Every exit revokes the one-time token in the shared
:class:`~rpbroker.policy.tokens.TokenStore`, so a token the client was told to
abandon can never be adopted later.

What it leaves to its caller: reading the clock, waiting for the ACK (the trio
shell wraps the wait in ``trio.move_on_after``), sleeping until
:meth:`AckRegistry.next_deadline` to sweep with :meth:`AckRegistry.expire_overdue`,
and degrading every non-completed outcome to the reconnect route.

Cost: register, acknowledge and abandon are O(log n); expiry and
``next_deadline`` use a min-heap with lazy deletion, O(log n) amortised per
entry, so per-operation cost stays flat at 100k pending entries.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import Final

import attrs

from rpbroker.policy._units import clamp_duration_s
from rpbroker.policy.fallback import Fallback, FallbackReason
from rpbroker.policy.tokens import HandoffToken, TokenStore

#: Seconds a backend has to acknowledge a passed connection. Much shorter than the
#: token TTL: a backend that holds the connection ACKs in milliseconds, and waiting
#: longer only delays the reconnect fallback.
DEFAULT_ACK_DEADLINE_S: Final[float] = 5.0

#: Garbage heap entries tolerated (beyond twice the live count) before rebuilding.
_HEAP_SLACK: Final[int] = 64


@attrs.frozen
class BackendRef:
    """The backend expected to acknowledge one handoff.

    ``pid`` is 0 when only the service is known (tokens are issued at Hello time,
    before a live pid may be resolved).
    """

    service_name: str
    pid: int = 0


class AckRejection(enum.Enum):
    """Why an acknowledgement did not complete a handoff."""

    #: Unknown token, already acknowledged, abandoned or swept as expired.
    NOT_PENDING = "not_pending"
    #: The entry was pending but its deadline had passed.
    DEADLINE_EXCEEDED = "deadline_exceeded"


@attrs.frozen
class AckCompleted:
    """The backend acknowledged in time; the handoff is complete."""

    token: HandoffToken
    backend: BackendRef
    #: Seconds between registration and acknowledgement.
    waited_s: float


@attrs.frozen
class AckRejected:
    """An acknowledgement that completed nothing."""

    reason: AckRejection
    #: The backend of the entry, when one was pending.
    backend: BackendRef | None = None
    #: The ACK window that was exceeded (seconds), for DEADLINE_EXCEEDED.
    deadline_s: float | None = None

    @property
    def deadline(self) -> float | None:
        """Alias of :attr:`deadline_s` (seconds)."""
        return self.deadline_s

    @property
    def fallback_reason(self) -> FallbackReason | None:
        """BACKEND_ACK_TIMEOUT for a late ACK; None for a token that was not pending."""
        if self.reason is AckRejection.DEADLINE_EXCEEDED:
            return FallbackReason.BACKEND_ACK_TIMEOUT
        return None


AckOutcome = AckCompleted | AckRejected


@attrs.frozen
class ExpiredHandoff:
    """A pending handoff whose deadline passed without an acknowledgement."""

    token: HandoffToken
    backend: BackendRef
    #: The ACK window that was exceeded (seconds).
    deadline_s: float
    reason: FallbackReason = FallbackReason.BACKEND_ACK_TIMEOUT

    def fallback(self) -> Fallback:
        """The silent reconnect fallback for this expiry."""
        return Fallback(self.reason)


@attrs.define
class _Entry:
    backend: BackendRef
    issued_at: float
    deadline_at: float
    deadline_s: float
    seq: int


class AckRegistry:
    """Handoffs awaiting backend acknowledgement, keyed by token.

    ``deadline_s`` that is not positive becomes 1 ms. An entry is overdue at
    ``now >= deadline_at``.
    """

    __slots__ = ("_deadline_s", "_entries", "_heap", "_seq", "_tokens")

    def __init__(self, tokens: TokenStore, deadline_s: float = DEFAULT_ACK_DEADLINE_S) -> None:
        self._tokens = tokens
        self._deadline_s = clamp_duration_s(deadline_s)
        self._entries: dict[HandoffToken, _Entry] = {}
        self._heap: list[tuple[float, int, HandoffToken]] = []
        self._seq = itertools.count()

    @property
    def tokens(self) -> TokenStore:
        """The token store whose tokens this registry revokes."""
        return self._tokens

    @property
    def deadline_s(self) -> float:
        """The default ACK window (seconds)."""
        return self._deadline_s

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        return token in self._entries

    def backend_of(self, token: HandoffToken) -> BackendRef | None:
        """The backend of a pending entry, else None."""
        entry = self._entries.get(token)
        return None if entry is None else entry.backend

    def deadline_of(self, token: HandoffToken) -> float | None:
        """Absolute deadline (monotonic seconds) of a pending entry, else None."""
        entry = self._entries.get(token)
        return None if entry is None else entry.deadline_at

    def register(
        self,
        token: HandoffToken,
        backend: BackendRef,
        now: float,
        deadline_s: float | None = None,
    ) -> float:
        """Start waiting for ``backend`` to acknowledge ``token``; returns the absolute deadline.

        ``deadline_s`` overrides the registry default for this entry (clamped the
        same way). Registering a pending token again replaces its entry.
        """
        window = self._deadline_s if deadline_s is None else clamp_duration_s(deadline_s)
        deadline_at = now + window
        seq = next(self._seq)
        self._entries[token] = _Entry(backend, now, deadline_at, window, seq)
        heapq.heappush(self._heap, (deadline_at, seq, token))
        self._maybe_compact()
        return deadline_at

    def acknowledge(self, token: HandoffToken, now: float) -> AckOutcome:
        """Complete the handoff for ``token`` if it is pending and on time.

        Not pending: :class:`AckRejected` NOT_PENDING (nothing changes). Pending but
        ``now >= deadline``: the entry is removed, the token revoked, and
        DEADLINE_EXCEEDED returned. Otherwise the entry is removed, the token
        revoked and :class:`AckCompleted` returned.
        """
        entry = self._entries.pop(token, None)
        if entry is None:
            return AckRejected(AckRejection.NOT_PENDING)
        self._tokens.revoke(token)
        self._maybe_compact()
        if now >= entry.deadline_at:
            return AckRejected(AckRejection.DEADLINE_EXCEEDED, entry.backend, entry.deadline_s)
        return AckCompleted(token, entry.backend, max(0.0, now - entry.issued_at))

    def abandon(self, token: HandoffToken) -> bool:
        """Give up on ``token``: remove its entry and always revoke the token.

        Returns whether an entry was pending. The token is revoked even when no
        entry was, so a late presentation of it is always refused.
        """
        entry = self._entries.pop(token, None)
        self._tokens.revoke(token)
        if entry is None:
            return False
        self._maybe_compact()
        return True

    def expire_overdue(self, now: float) -> list[ExpiredHandoff]:
        """Remove and return every entry overdue at ``now``, earliest deadline first.

        Each expired token is revoked; the caller falls back to reconnect for it.
        """
        expired: list[ExpiredHandoff] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _deadline_at, seq, token = heapq.heappop(heap)
            entry = self._entries.get(token)
            if entry is None or entry.seq != seq:
                continue  # stale: completed, abandoned or re-registered
            del self._entries[token]
            self._tokens.revoke(token)
            expired.append(ExpiredHandoff(token, entry.backend, entry.deadline_s))
        return expired

    def next_deadline(self) -> float | None:
        """The earliest pending deadline (monotonic seconds), or None when empty."""
        heap = self._heap
        while heap:
            _deadline_at, seq, token = heap[0]
            entry = self._entries.get(token)
            if entry is not None and entry.seq == seq:
                return entry.deadline_at
            heapq.heappop(heap)
        return None

    def _maybe_compact(self) -> None:
        if len(self._heap) > 2 * len(self._entries) + _HEAP_SLACK:
            self._heap = [(e.deadline_at, e.seq, tok) for tok, e in self._entries.items()]
            heapq.heapify(self._heap)
