"""Pending-ACK registry: a handoff completes only if its backend ACKs in time.

What this module does: tracks every issued handoff token that still awaits the
backend's acknowledgement, with an absolute deadline (5 s after registration by
default). Each entry leaves the registry exactly once, by one of:
acknowledgement in time (completed), a late acknowledgement (rejected), or
abandonment (the attempt failed, expired or was given up). Every exit revokes the
one-time token in the shared :class:`~rpbroker.policy.tokens.TokenStore`, so a
token the client was told to abandon can never be adopted later.

What it leaves to its caller: reading the clock, waiting for the ACK until the
entry's deadline (the trio shell wraps each attempt's wait in
``trio.move_on_at``, so every attempt abandons its own expired entry), and
degrading every non-completed outcome to the reconnect route.

Cost: register, acknowledge and abandon are O(1) dictionary operations, so
per-operation cost stays flat at 100k pending entries.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from rpbroker.policy._units import clamp_duration_s
from rpbroker.policy.tokens import HandoffToken, TokenStore

#: Seconds a backend has to acknowledge a passed connection. Much shorter than the
#: token TTL: a backend that holds the connection ACKs in milliseconds, and waiting
#: longer only delays the reconnect fallback.
DEFAULT_ACK_DEADLINE_S: Final[float] = 5.0


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


AckOutcome = AckCompleted | AckRejected


@attrs.define
class _Entry:
    backend: BackendRef
    issued_at: float
    deadline_at: float
    deadline_s: float


class AckRegistry:
    """Handoffs awaiting backend acknowledgement, keyed by token.

    ``deadline_s`` that is not positive becomes 1 ms. An entry is overdue at
    ``now >= deadline_at``.
    """

    __slots__ = ("_deadline_s", "_entries", "_tokens")

    def __init__(self, tokens: TokenStore, deadline_s: float = DEFAULT_ACK_DEADLINE_S) -> None:
        self._tokens = tokens
        self._deadline_s = clamp_duration_s(deadline_s)
        self._entries: dict[HandoffToken, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, token: HandoffToken, backend: BackendRef, now: float) -> float:
        """Start waiting for ``backend`` to acknowledge ``token``; returns the absolute deadline.

        Registering a pending token again replaces its entry.
        """
        deadline_at = now + self._deadline_s
        self._entries[token] = _Entry(backend, now, deadline_at, self._deadline_s)
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
        return entry is not None
