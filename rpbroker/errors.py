"""Typed exceptions that rpbroker raises to its callers.

What this module does: names every failure a client, a backend author or an
embedder can see, each carrying the values needed to act on it (the wire refusal
code and retry-after for refusals).

What it does not do: decide anything. Optimisation failures of the handoff route
never surface here: they degrade silently to the reconnect route.
"""

from __future__ import annotations

from rpbroker.wire.codes import RefusalCode


class BrokerError(Exception):
    """Base class of rpbroker's exceptions."""


class RefusedError(BrokerError):
    """The broker refused the request with a wire refusal code.

    ``retry_after_ms`` is set where retrying later can help (rate limits, spawn
    failures inside the crash window, fd pressure, blocked versions).
    """

    def __init__(self, code: RefusalCode, reason: str, retry_after_ms: int | None = None) -> None:
        hint = f" (retry after {retry_after_ms} ms)" if retry_after_ms else ""
        super().__init__(f"{code.name}: {reason}{hint}")
        self.code = code
        self.reason = reason
        self.retry_after_ms = retry_after_ms


class BrokerUnavailableError(BrokerError):
    """No broker answers at the endpoint (missing, refused, or it closed without a reply)."""


class BrokerProtocolError(BrokerError):
    """The broker (or a peer claiming to be one) sent something that is not valid v1."""


class BackendUnavailableError(BrokerError):
    """The broker negotiated a backend, but its endpoint could not be reached."""


class ConnectTimeoutError(BrokerError):
    """The overall connect timeout expired before a route to the backend was established."""


class BackendEnvironmentError(BrokerError):
    """A backend was started without the environment a broker provides (not brokered)."""


class ConfigError(BrokerError):
    """A broker configuration value is invalid; the message names the field and the fix."""
