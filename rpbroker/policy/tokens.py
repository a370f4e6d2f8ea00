"""One-time handoff tokens: the token value, its parsing, and the broker's store.

What this module does: :class:`HandoffToken` is an opaque 16-byte value with
constant-time equality; :func:`parse_token` turns presented raw bytes into one
or into a typed rejection; :class:`TokenVerdict` names every way a presented
token is judged, with the ``HandoffAck.error_detail`` text of each (the backend
SDK uses them). :class:`TokenStore` is the broker's store of pending tokens (16
random bytes each, a 30 s time-to-live, at most 1024 pending): issue, revoke,
and expiry, every operation taking ``now`` (seconds on a monotonic clock).

What it leaves to its caller: reading the clock, carrying the raw bytes on the
wire (``Negotiated.handle_passed_token``, ``HandoffOffer.token``,
``HandoffAck.token``), deciding when a token is done (the pending-ACK registry
revokes it) and any locking; the store is not thread-safe and is meant to be
owned by one trio task tree.

Deliberate difference from the reference: token equality is constant-time
(:func:`hmac.compare_digest`). The reference compares bytes plainly.
"""

from __future__ import annotations

import enum
import heapq
import hmac
import itertools
import secrets
from collections.abc import Callable
from typing import Final

import attrs

from rpbroker.policy._units import clamp_count, clamp_duration_s

#: Token size in bytes (128 bits); the wire carries exactly these raw bytes.
HANDOFF_TOKEN_BYTES: Final[int] = 16
#: Seconds a token stays pending: long enough for any real handoff, short enough
#: that an abandoned one does not hold capacity for long.
DEFAULT_TOKEN_TTL_S: Final[float] = 30.0
#: Maximum tokens pending at once; bounds memory whatever clients do.
DEFAULT_MAX_PENDING_TOKENS: Final[int] = 1024
#: Random draws per issue before giving up; a collision of 128-bit values means the
#: random source is broken, so a small bound is enough.
DEFAULT_COLLISION_ATTEMPTS: Final[int] = 16

#: Garbage heap entries tolerated (beyond twice the live count) before the expiry
#: heap is rebuilt; keeps revocation O(1) amortised and memory bounded.
_HEAP_SLACK: Final[int] = 64


def _to_bytes(value: bytes | bytearray | memoryview) -> bytes:
    return bytes(value)


def _check_length(_instance: object, _attribute: object, value: bytes) -> None:
    if len(value) != HANDOFF_TOKEN_BYTES:
        raise ValueError(f"a handoff token is {HANDOFF_TOKEN_BYTES} bytes, got {len(value)} bytes")


@attrs.frozen(eq=False, repr=False)
class HandoffToken:
    """An opaque one-time token of exactly :data:`HANDOFF_TOKEN_BYTES` bytes.

    Equality is constant-time; the hash is the hash of the bytes, so tokens work
    as dictionary keys. ``repr`` never shows the bytes.
    """

    raw: bytes = attrs.field(converter=_to_bytes, validator=_check_length)

    @classmethod
    def generate(cls, random_source: Callable[[int], bytes] = secrets.token_bytes) -> HandoffToken:
        """Draw a fresh token from ``random_source`` (OS randomness by default)."""
        return cls(random_source(HANDOFF_TOKEN_BYTES))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HandoffToken):
            return NotImplemented
        return hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return "HandoffToken(<redacted>)"

    def __bytes__(self) -> bytes:
        return self.raw


class TokenVerdict(enum.Enum):
    """How a presented token was judged (the SDK's offer checks report these)."""

    ACCEPTED = "accepted"
    NOT_PENDING = "not_pending"
    EXPIRED = "expired"
    MISMATCH = "mismatch"
    MISSING = "missing"
    BAD_LENGTH = "bad_length"

    def detail(self, presented_len: int | None = None) -> str:
        """Human-readable detail, as carried in ``HandoffAck.error_detail``.

        ``presented_len`` is the byte length of the presented token; it only
        matters for :attr:`BAD_LENGTH`. :attr:`ACCEPTED` has an empty detail.
        """
        if self is TokenVerdict.BAD_LENGTH:
            if presented_len is None:
                return f"handoff token has the wrong length; expected {HANDOFF_TOKEN_BYTES}"
            return f"handoff token length was {presented_len} bytes; expected {HANDOFF_TOKEN_BYTES}"
        return _DETAILS[self]


_DETAILS: Final[dict[TokenVerdict, str]] = {
    TokenVerdict.ACCEPTED: "",
    TokenVerdict.NOT_PENDING: "handoff token is not pending",
    TokenVerdict.EXPIRED: "handoff token expired",
    TokenVerdict.MISMATCH: "handoff token mismatch",
    TokenVerdict.MISSING: "handoff token is missing",
}


@attrs.frozen
class TokenRejection:
    """A presented token that could not even be parsed."""

    verdict: TokenVerdict
    detail: str


def parse_token(data: bytes | bytearray | memoryview) -> HandoffToken | TokenRejection:
    """Parse raw presented bytes: empty is MISSING, any length but 16 is BAD_LENGTH."""
    raw = bytes(data)
    if not raw:
        return TokenRejection(TokenVerdict.MISSING, TokenVerdict.MISSING.detail())
    if len(raw) != HANDOFF_TOKEN_BYTES:
        return TokenRejection(TokenVerdict.BAD_LENGTH, TokenVerdict.BAD_LENGTH.detail(len(raw)))
    return HandoffToken(raw)


class TokenStoreError(Exception):
    """Base class of the errors :meth:`TokenStore.issue` can raise."""


class TokenStoreFull(TokenStoreError):
    """Every pending slot is taken; the caller downgrades to the reconnect route."""

    def __init__(self, max_pending: int) -> None:
        super().__init__(f"pending handoff token limit reached ({max_pending})")
        self.max_pending = max_pending


class TokenCollisionExhausted(TokenStoreError):
    """Every random candidate collided with a pending token."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"handoff token collisions exhausted after {attempts} attempts")
        self.attempts = attempts


class TokenStore:
    """Pending one-time tokens with a time-to-live and a capacity bound.

    ``max_pending`` and ``collision_attempts`` below 1 become 1; a ``ttl_s`` that
    is not positive becomes 1 ms. A token is pending while ``now < issued + ttl``
    (so it is expired exactly at ``now == issued + ttl``).

    Expiry uses a min-heap with lazy deletion: issue, revoke and pruning are
    O(log n) amortised, whatever the number of pending tokens.
    """

    __slots__ = (
        "_collision_attempts",
        "_expires",
        "_heap",
        "_max_pending",
        "_random",
        "_seq",
        "_ttl_s",
    )

    def __init__(
        self,
        max_pending: int = DEFAULT_MAX_PENDING_TOKENS,
        ttl_s: float = DEFAULT_TOKEN_TTL_S,
        collision_attempts: int = DEFAULT_COLLISION_ATTEMPTS,
        random_source: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._max_pending = clamp_count(max_pending)
        self._ttl_s = clamp_duration_s(ttl_s)
        self._collision_attempts = clamp_count(collision_attempts)
        self._random = random_source
        # token -> (expires_at, heap sequence number of its live heap entry)
        self._expires: dict[HandoffToken, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, HandoffToken]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Tokens held, including any expired ones not yet pruned."""
        return len(self._expires)

    # -- operations ------------------------------------------------------------------

    def issue(self, now: float) -> HandoffToken:
        """Prune, then draw and hold a fresh token that expires at ``now + ttl_s``.

        Raises :class:`TokenStoreFull` at capacity and
        :class:`TokenCollisionExhausted` when every draw collided. A random source
        that returns the wrong number of bytes raises :class:`ValueError`.
        """
        self._prune(now)
        if len(self._expires) >= self._max_pending:
            raise TokenStoreFull(self._max_pending)
        for _ in range(self._collision_attempts):
            token = HandoffToken(self._random(HANDOFF_TOKEN_BYTES))
            if token in self._expires:
                continue
            self._hold(token, now + self._ttl_s)
            return token
        raise TokenCollisionExhausted(self._collision_attempts)

    def revoke(self, token: HandoffToken) -> bool:
        """Forget ``token`` without consuming it; True when it was held."""
        if token not in self._expires:
            return False
        self._drop(token)
        return True

    # -- internals -------------------------------------------------------------------

    def _hold(self, token: HandoffToken, expires_at: float) -> None:
        seq = next(self._seq)
        self._expires[token] = (expires_at, seq)
        heapq.heappush(self._heap, (expires_at, seq, token))
        self._maybe_compact()

    def _drop(self, token: HandoffToken) -> None:
        del self._expires[token]
        self._maybe_compact()

    def _prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _expires_at, seq, token = heapq.heappop(heap)
            entry = self._expires.get(token)
            if entry is None or entry[1] != seq:
                continue  # stale heap entry: revoked
            del self._expires[token]

    def _maybe_compact(self) -> None:
        if len(self._heap) > 2 * len(self._expires) + _HEAP_SLACK:
            self._heap = [(exp, seq, tok) for tok, (exp, seq) in self._expires.items()]
            heapq.heapify(self._heap)
