"""Broker configuration as one attrs class.

What this module does: defines ``BrokerConfig``, every tunable of a broker with its
default, unit and reason, validated at construction so a bad value fails with a
message naming the field and the fix.

What it does not do: read files or environment variables (``rpbroker.config_file``
reads broker config files, the CLI maps its flags onto this class), or hold
runtime state.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import attrs

from rpbroker.errors import ConfigError

#: Absolute deadline for a new connection's first frame, seconds (facts §5.1: 30 s).
DEFAULT_HELLO_TIMEOUT_S = 30.0
#: How long a Hello may wait for its backend (spawn + readiness) when the frame carries
#: no ``deadline_unix_ms``, seconds. Bounded separately from the read deadline.
DEFAULT_HELLO_WAIT_TIMEOUT_S = 30.0
#: Hard ceiling on a backend becoming ready after spawn, seconds (facts §6: 60 s).
DEFAULT_SPAWN_READY_TIMEOUT_S = 60.0
#: How long graceful shutdown lets backends drain before killing them, seconds (SPEC §7).
DEFAULT_DRAIN_TIMEOUT_S = 10.0
#: The adoption deadline of a handoff, seconds after the broker's reply: written into
#: the offer (the backend never adopts after it) and into the reply frame (the client
#: waits for the handoff-ready EVENT until it, plus a small grace). 1.5 s keeps it
#: below the reference client's fixed 2 s wait, so reference clients are safe too.
DEFAULT_HANDOFF_ADOPT_WINDOW_S = 1.5
#: Lifecycle events kept in memory for admin DUMP.
DEFAULT_EVENT_LOG_SIZE = 512


class ServiceManager(enum.Enum):
    """Which service manager the broker cooperates with."""

    #: None: bind ``socket_path``, report to nobody (the default when embedding).
    NONE = "none"
    #: systemd: serve the socket it passed (``LISTEN_FDS``) when there is one, else
    #: bind as usual; report readiness and shutdown to ``$NOTIFY_SOCKET`` when set.
    #: Without those variables it behaves like ``NONE``.
    SYSTEMD = "systemd"


class ConfigValueError(ConfigError):
    """A ``BrokerConfig`` field was given a value it does not accept.

    ``field`` is the field's name and ``expected`` what it accepts ("a positive
    number of seconds"), so a caller that took the value from somewhere else (a
    flag, a config file) can name that place instead of the field.
    """

    def __init__(self, field: str, expected: str, value: object) -> None:
        super().__init__(f"BrokerConfig.{field} must be {expected} (got {value!r})")
        self.field = field
        self.expected = expected
        self.value = value


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigValueError(attribute.name, "a positive number of seconds", value)


def _positive_int(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not (isinstance(value, int) and value > 0):
        raise ConfigValueError(attribute.name, "a positive integer", value)


def _as_path(value: str | os.PathLike[str]) -> Path:
    return Path(value)


@attrs.frozen(kw_only=True)
class BrokerConfig:
    """Everything a broker needs to run.

    ``services_dir`` holds ``<name>.toml`` / ``<name>.servicedef`` files and must be
    private to the user (mode 0700). ``socket_path`` is the broker endpoint; ``None``
    uses the per-user shared endpoint in the runtime directory. ``runtime_dir`` is
    where backend endpoints are created; ``None`` uses the per-user runtime directory.
    ``service_manager`` is ``ServiceManager.SYSTEMD`` for socket activation and
    readiness notification (``rpbroker serve`` sets it); with an inherited socket,
    ``socket_path`` may be left ``None`` (or must name that socket).
    """

    services_dir: Path = attrs.field(converter=_as_path)
    socket_path: str | None = None
    runtime_dir: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(_as_path)
    )
    hello_timeout_s: float = attrs.field(default=DEFAULT_HELLO_TIMEOUT_S, validator=_positive)
    hello_wait_timeout_s: float = attrs.field(
        default=DEFAULT_HELLO_WAIT_TIMEOUT_S, validator=_positive
    )
    spawn_ready_timeout_s: float = attrs.field(
        default=DEFAULT_SPAWN_READY_TIMEOUT_S, validator=_positive
    )
    drain_timeout_s: float = attrs.field(default=DEFAULT_DRAIN_TIMEOUT_S, validator=_positive)
    handoff_enabled: bool = True
    handoff_adopt_window_s: float = attrs.field(
        default=DEFAULT_HANDOFF_ADOPT_WINDOW_S, validator=_positive
    )
    ack_deadline_s: float = attrs.field(default=5.0, validator=_positive)
    hello_rate_limit: int = attrs.field(default=256, validator=_positive_int)
    hello_rate_window_s: float = attrs.field(default=1.0, validator=_positive)
    spawn_attempts_per_window: int = attrs.field(default=3, validator=_positive_int)
    spawn_window_s: float = attrs.field(default=30.0, validator=_positive)
    #: Spawn attempts per service across all its versions per ``spawn_window_s``.
    spawn_attempts_per_service_window: int = attrs.field(default=6, validator=_positive_int)
    recovery_backoff_s: float = attrs.field(default=0.25, validator=_positive)
    recovery_window_s: float = attrs.field(default=30.0, validator=_positive)
    broadcast_ack_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    idle_check_enabled: bool = True
    event_log_size: int = attrs.field(default=DEFAULT_EVENT_LOG_SIZE, validator=_positive_int)
    instance_name: str = "shared"
    backend_env: dict[str, str] = attrs.field(factory=dict)
    service_manager: ServiceManager = ServiceManager.NONE
