"""Typed exceptions that rpbroker raises to its callers.

What this module does: names every failure a client, a backend author or an
embedder can see, each carrying the values needed to act on it (for refusals the
wire code, retry-after and the values the broker sent in ``Refused.details``).

What it does not do: decide anything. Optimisation failures of the handoff route
never surface here: they degrade silently to the reconnect route.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from rpbroker.policy.hello import quoted_value
from rpbroker.wire.codes import RefusalCode, RefusalDetail


class BrokerError(Exception):
    """Base class of rpbroker's exceptions."""


class RefusedError(BrokerError):
    """The broker refused the request with a wire refusal code.

    ``retry_after_ms`` is set where retrying later can help (rate limits, spawn
    failures inside the crash window, fd pressure, blocked versions). ``details``
    is the refusal's ``Refused.details`` map as received (read-only; empty from a
    reference broker); the typed properties read rpbroker's keys from it and are
    ``None`` (or empty) when the broker did not send them.
    """

    def __init__(
        self,
        code: RefusalCode,
        reason: str,
        retry_after_ms: int | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.details: Mapping[str, str] = MappingProxyType(dict(details or {}))
        values = ", ".join(f"{key}={value!r}" for key, value in sorted(self.details.items()))
        shown = f" ({values})" if values else ""
        hint = f" (retry after {retry_after_ms} ms)" if retry_after_ms else ""
        super().__init__(f"{code.name}: {reason}{shown}{hint}")

    @property
    def service_name(self) -> str | None:
        """The service the broker does not know (SERVICE_UNKNOWN)."""
        return self.details.get(RefusalDetail.SERVICE_NAME)

    @property
    def wanted_version(self) -> str | None:
        """The version that was asked for (VERSION_BLOCKED)."""
        return self.details.get(RefusalDetail.WANTED_VERSION)

    @property
    def min_version(self) -> str | None:
        """The service's version floor, if it has one (VERSION_BLOCKED)."""
        return self.details.get(RefusalDetail.MIN_VERSION)

    @property
    def version_allow_list(self) -> tuple[str, ...]:
        """The service's exact allow-list; empty when it has none (VERSION_BLOCKED)."""
        joined = self.details.get(RefusalDetail.VERSION_ALLOW_LIST, "")
        return tuple(joined.split(",")) if joined else ()

    @property
    def rejected_field(self) -> str | None:
        """The Hello field that failed its shape check (PEER_REJECTED)."""
        return self.details.get(RefusalDetail.FIELD)

    @property
    def rejected_value(self) -> str | None:
        """That field's value as the broker quoted it: escaped, maybe truncated."""
        return self.details.get(RefusalDetail.VALUE)

    @property
    def grammar(self) -> str | None:
        """The grammar the rejected field must match."""
        return self.details.get(RefusalDetail.GRAMMAR)


class ConnectArgumentError(BrokerError, ValueError):
    """An argument of ``connect`` is malformed; raised before anything is sent.

    ``argument`` is the parameter's name, ``value`` what was passed and ``grammar``
    what it must match (the broker would refuse it with PEER_REJECTED). The
    message quotes the value escaped and truncated.
    """

    def __init__(self, argument: str, value: str, grammar: str) -> None:
        super().__init__(
            f"{argument} {quoted_value(value)!r} is malformed: it must match {grammar}"
        )
        self.argument = argument
        self.value = value
        self.grammar = grammar


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
