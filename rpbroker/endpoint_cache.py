"""The client's memory of backend endpoints, for Hello-skip.

What this module does: ``EndpointCache`` maps (broker endpoint, service, version)
to the backend endpoint the broker last negotiated for it, with the state of its
identity check: not yet probed, verified, or refused (the probe failed, so
Hello-skip is not used for that endpoint until the broker negotiates another).
``current_endpoint_cache()`` is the cache of the running trio run (held in a
``trio.lowlevel.RunVar``), which ``rpbroker.connect`` uses unless it is given one.

What it does not do: probe, connect, or expire entries by time. An entry goes
when a connect to it fails or the broker negotiates a different endpoint.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from typing import Final

import attrs
import trio

#: (broker endpoint, service name, service version).
CacheKey = tuple[str, str, str]


class EndpointCheck(enum.Enum):
    """How far a cached endpoint's identity has been checked."""

    UNVERIFIED = "unverified"  # negotiated by the broker, never probed
    VERIFIED = "verified"  # the probe's identity passed every check
    REFUSED = "refused"  # the probe failed: reach this endpoint through a Hello


@attrs.frozen
class CachedEndpoint:
    """A backend endpoint learned from the broker and how far it has been checked."""

    endpoint: str
    check: EndpointCheck


class EndpointCache:
    """Backend endpoints by (broker, service, version), owned by one client.

    Thread-safe: the blocking client (``rpbroker.BlockingClient``) shares one
    between threads; every method holds a lock for a few dictionary operations.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[CacheKey, CachedEndpoint] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: CacheKey) -> CachedEndpoint | None:
        """The entry for ``key``, or ``None``."""
        with self._lock:
            return self._entries.get(key)

    def remember(self, key: CacheKey, endpoint: str) -> None:
        """Record that the broker negotiated ``endpoint`` for ``key``.

        The same endpoint keeps its check; a different one starts unverified.
        """
        with self._lock:
            current = self._entries.get(key)
            if current is None or current.endpoint != endpoint:
                self._entries[key] = CachedEndpoint(endpoint, EndpointCheck.UNVERIFIED)

    def record_check(self, key: CacheKey, endpoint: str, check: EndpointCheck) -> None:
        """Record the outcome of probing ``endpoint`` (ignored if the entry moved on)."""
        with self._lock:
            current = self._entries.get(key)
            if current is not None and current.endpoint == endpoint:
                self._entries[key] = CachedEndpoint(endpoint, check)

    def forget(self, key: CacheKey, endpoint: str) -> None:
        """Drop the entry for ``key`` if it still names ``endpoint`` (it stopped answering)."""
        with self._lock:
            current = self._entries.get(key)
            if current is not None and current.endpoint == endpoint:
                del self._entries[key]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()


_RUN_CACHE: Final = trio.lowlevel.RunVar[EndpointCache]("rpbroker_endpoint_cache")


def current_endpoint_cache() -> EndpointCache:
    """The endpoint cache of the current trio run, created on first use."""
    try:
        return _RUN_CACHE.get()
    except LookupError:
        cache = EndpointCache()
        _RUN_CACHE.set(cache)
        return cache


def forget_run_cache() -> None:
    """Empty the current run's cache; outside ``trio.run`` there is none, so nothing to do."""
    # LookupError: no cache in this run yet; RuntimeError: not inside trio.run.
    with contextlib.suppress(LookupError, RuntimeError):
        _RUN_CACHE.get().clear()
